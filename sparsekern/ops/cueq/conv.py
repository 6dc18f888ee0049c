"""cuEquivariance back end of the channelwise ('uvu') tensor product and the fused
convolution: one segmented tensor product ``w[u] x1[i, u] x2[j] -> out[k, u]`` whose
path p has the coefficient table ``TPDesc.coefficients(p)`` (scale * Clebsch-Gordan,
float64). The conv gathers the senders' features and sums into the receivers inside
the polynomial (its input and output indices); the per-edge weights come from the
radial MLP, with any delta already in them, so there is nothing to fold here."""

from __future__ import annotations

import cuequivariance as cue
import torch

from ..descriptors import TPDesc
from .polynomial import module, transpose


def _polynomial(desc: TPDesc) -> cue.SegmentedPolynomial:
    d = cue.SegmentedTensorProduct.from_subscripts("u,iu,j,ku+ijk")
    for mul, dim in zip(desc.blocks_in1.muls, desc.blocks_in1.dims):
        d.add_segment(1, (dim, mul))
    for size in desc.blocks_in2.sizes:  # multiplicity 1 (the layer refuses others)
        d.add_segment(2, (size,))
    for mul, dim in zip(desc.blocks_out.muls, desc.blocks_out.dims):
        d.add_segment(3, (dim, mul))
    for p in desc.paths:  # one weight segment per path, in the layer's order
        if p.weight_offset != d.operands[0].size:
            raise ValueError(f"cueq conv: path weights at {p.weight_offset}, expected {d.operands[0].size}")
        w = d.add_segment(0, (p.mul_in,))
        d.add_path(w, p.i_in, p.i_in2, p.i_out, c=desc.coefficients(p).numpy())
    if d.operands[0].size != desc.weight_numel:
        raise ValueError(f"cueq conv: paths read {d.operands[0].size} weights of {desc.weight_numel}")
    return cue.SegmentedPolynomial.eval_last_operand(d)


def _module(desc: TPDesc, like: torch.Tensor) -> torch.nn.Module:
    return desc.const("cueq", like, lambda: module(_polynomial(desc), like))


def channelwise_tp(desc: TPDesc, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-edge messages (E, irreps_out.dim)."""
    [out] = _module(desc, x1)([weight, transpose(x1, desc.blocks_in1, True), x2])
    return transpose(out, desc.blocks_out, False)


def conv(desc: TPDesc, node_feats: torch.Tensor, edge_attrs: torch.Tensor, tp_weights: torch.Tensor,
         edge_index: torch.Tensor) -> torch.Tensor:
    """sum over edges e with receiver(e) = n of the product of node_feats[sender(e)];
    ``edge_index[0]`` holds senders, ``edge_index[1]`` receivers."""
    n = node_feats.shape[0]
    sender, receiver = edge_index[0], edge_index[1]
    if sender.shape[0] == 0:  # the naive method takes an empty index for none: sum no messages here
        messages = channelwise_tp(desc, node_feats.index_select(0, sender), edge_attrs, tp_weights)
        return messages.new_zeros(n, messages.shape[1]).index_add(0, receiver, messages)
    # transposed per node, before the gather: N rows, not E
    [out] = _module(desc, node_feats)(
        [tp_weights, transpose(node_feats, desc.blocks_in1, True), edge_attrs],
        input_indices={1: sender}, output_indices={0: receiver},
        output_shapes={0: node_feats.new_empty(n, 0)})
    return transpose(out, desc.blocks_out, False)
