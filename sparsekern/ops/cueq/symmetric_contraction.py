"""cuEquivariance back end of MACE's symmetric contraction: per degree nu one segmented
tensor product ``W[k, u] x[a, u] .. x[., u] -> out[m, u]`` (u the channel) whose
coefficient for output j is U'_nu (``ContractionDesc.tables``: U summed over the
orderings of each index tuple, on the sorted tuples only, float64), so each monomial
is formed once. The weights of every (output, degree) are one row per element,
gathered by species inside the polynomial; a delta is folded into them first."""

from __future__ import annotations

import string
from typing import Optional, Sequence

import cuequivariance as cue
import torch

from ...delta_slot import effective
from ..descriptors import ContractionDesc
from .polynomial import module, transpose


def _polynomial(desc: ContractionDesc) -> cue.SegmentedPolynomial:
    tables, d, c = desc.tables(), desc.coupling_dim, desc.num_features
    # (output, degree, U'): the weight segments, in the order the forward concatenates them
    blocks = [(j, nu, u) for j, (us, corr) in enumerate(zip(tables.u, desc.correlations))
              for nu, u in enumerate(us[:corr], start=1) if u.shape[2]]
    operations = []
    for degree in range(1, max(desc.correlations) + 1):
        index = string.ascii_lowercase[:degree]  # the x factors' modes (a, b, ..; not k, m, u)
        stp = cue.SegmentedTensorProduct.from_subscripts(
            "ku," + ",".join(f"{a}u" for a in index) + f",mu+m{index}k")
        for _, _, u in blocks:
            stp.add_segment(0, (u.shape[2], c))
        for i in range(1, degree + 1):
            stp.add_segment(i, (d, c))
        for m in desc.blocks_out.dims:
            stp.add_segment(degree + 1, (m, c))
        for w, (j, nu, u) in enumerate(blocks):
            if nu == degree:
                dense = u.new_zeros((u.shape[0],) + (d,) * nu + (u.shape[2],))
                dense[(slice(None),) + tuple(tables.tuples[nu - 1].t())] = u
                stp.add_path(w, *([0] * nu), j, c=dense.numpy())
        if stp.num_paths:  # the naive method refuses a product without paths
            operations.append((cue.Operation([0] + [1] * degree + [2]), stp))
    w_op, x_op, *_, out_op = operations[0][1].operands
    return cue.SegmentedPolynomial([w_op, x_op], [out_op], operations)


def symmetric_contraction(desc: ContractionDesc, x: torch.Tensor, species: torch.Tensor,
                          weights: Sequence[Sequence[torch.Tensor]],
                          deltas: Sequence[Sequence[Optional[torch.Tensor]]]) -> torch.Tensor:
    """x (nodes, channels, coupling dim) -> (nodes, irreps_out.dim); ``weights`` per output
    [W_1, ..., W_correlation], each (n_el, k_nu, channels), ``deltas`` alike (flat or None)."""
    n = x.shape[0]
    ws = [effective(w, dw) for wj, dj in zip(weights, deltas) for w, dw in zip(wj, dj) if w.shape[1]]
    w_rows = torch.cat([w.reshape(w.shape[0], -1) for w in ws], 1)  # (n_el, sum k * c), "ku" blocks
    poly = desc.const("cueq", x, lambda: module(_polynomial(desc), x))
    [out] = poly([w_rows, x.transpose(1, 2).reshape(n, x.shape[1] * x.shape[2])], input_indices={0: species})
    return transpose(out, desc.blocks_out, False)  # blocks of num_features channels

