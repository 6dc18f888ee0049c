"""Torch reference of MACE's symmetric contraction. The product of x's is symmetric, so
U_nu is summed over the orderings of each index tuple once (U'_nu[m, q, k], q a sorted
tuple) and only the tuples where U' is nonzero are kept (:meth:`ContractionDesc.tables`).
Per element present, W is folded into U' (one 2-D product: A[c, m, q]); each node's
monomials F[c, q] are built degree by degree (a gather and a product per degree), and
the output is one batched product over channels per element, A (c, m, q) @ F (c, q, nodes)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ...delta_slot import effective
from ...paths import cat
from ..descriptors import ContractionDesc, MonomialTables
from .opaque import opaque_to_compile
from .take import TakeRows


def symmetric_contraction(desc: ContractionDesc, x: torch.Tensor, species: torch.Tensor,
                          weights: Sequence[Sequence[torch.Tensor]],
                          deltas: Sequence[Sequence[Optional[torch.Tensor]]]) -> torch.Tensor:
    """x (nodes, channels, coupling dim) -> (nodes, irreps_out.dim); ``weights`` per output
    [W_1, ..., W_correlation], each (n_el, k_nu, channels), ``deltas`` alike (flat or None)."""
    ws = [effective(w, d) for wj, dj in zip(weights, deltas) for w, d in zip(wj, dj)]
    return _contract(desc, x, species, *ws)


@opaque_to_compile  # the sizes of the element groups are read on the host
def _contract(desc: ContractionDesc, x: torch.Tensor, species: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
    """The contraction with the weights W + dW of every output's degrees in one list."""
    n = x.shape[0]
    if n == 0:  # (in the graph of its inputs, as an empty product is: zero gradients)
        return x.new_zeros(0, desc.blocks_out.dim) + sum(t.sum() for t in (x, *flat)) * 0
    tables = desc.const("monomials", x, desc.tables)
    order = torch.argsort(species, stable=True)
    counts = torch.bincount(species, minlength=desc.num_elements).tolist()
    present = [z for z, cnt in enumerate(counts) if cnt]
    it = iter(flat)
    ws = [[next(it) for _ in range(correlation)] for correlation in desc.correlations]
    coef = _coefficients(desc, tables, ws, torch.tensor(present, device=x.device))  # (present, c, M, Q)
    # chunks bound the (c, Q, nodes) monomials; split (not slicing) keeps the
    # backward to one concatenation instead of one zero-filled tensor per chunk
    chunk = max(1, 2 ** 24 // (desc.num_features * tables.num_monomials))
    which = [j for j, z in enumerate(present) for _ in range(0, counts[z], chunk)]
    sizes = [min(chunk, counts[z] - lo) for z in present for lo in range(0, counts[z], chunk)]
    rows = desc.const("monomial_rows", x, lambda: _monomial_rows(tables, desc.num_features))
    # each chunk (c, i, nodes), contiguous: channels are the batch of the product below
    xs = [xz.permute(1, 2, 0).contiguous() for xz in x.index_select(0, order).split(sizes)]
    blocks = [torch.bmm(coef[j], _monomials(xz, rows)) for xz, j in zip(xs, which)]
    y = torch.cat(blocks, 2).permute(2, 0, 1)  # (nodes, c, M)
    ys = torch.cat([yl.reshape(n, -1) for yl in y.split(tables.m, dim=2)], 1)  # mul_ir layout
    return torch.empty_like(ys).index_copy(0, order, ys)


def _monomials(xz: torch.Tensor, rows: List[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """F (c, Q, nodes): every kept monomial, degree by degree; xz is (c, i, nodes)."""
    levels = [xz]
    for parent, last in rows:
        levels.append(_rows(levels[-1], parent) * _rows(xz, last))
    return cat(levels, 1)


def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t (c, q, nodes) at (c, rows' q, nodes): a gather of whole rows of nodes from the
    (c * q, nodes) view, and its gradient an addition of whole rows, where both along the
    middle axis move one strided slab per index (slower on CPUs: ``cpu_step_ops.py``);
    contiguous rows in every derivative (:class:`TakeRows`)."""
    c, _, n = t.shape
    return TakeRows.apply(t.reshape(-1, n), rows).view(c, -1, n)


def _monomial_rows(tables: MonomialTables, channels: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per degree 2.., the rows of the (c * Q_prev, nodes) and (c * i, nodes) views that
    ``parent`` and ``last`` read, channel by channel."""
    c, d = torch.arange(channels)[:, None], tables.tuples[0].shape[0]
    previous = [d] + [len(parent) for parent in tables.parent[:-1]]  # each degree's Q below
    return [((c * q + parent).flatten(), (c * d + last).flatten())
            for q, parent, last in zip(previous, tables.parent, tables.last)]


def _coefficients(desc: ContractionDesc, tables: MonomialTables, ws: List[List[torch.Tensor]],
                  present: torch.Tensor) -> torch.Tensor:
    """A[e, c, M, Q] = sum_k U'[M, Q, k] W[present[e], k, c], outputs stacked along M."""
    c, zp = desc.num_features, len(present)
    per_output = []
    for u_j, w_j in zip(tables.u, ws):
        per_degree = []
        # degrees above this output's correlation (a per-irrep correlation) have k = 0
        for u, w in zip(u_j, w_j + [None] * (len(u_j) - len(w_j))):
            m, q, k = u.shape
            if k == 0:
                per_degree.append(u.new_zeros(zp, m, q, c))
                continue
            wz = w.index_select(0, present)  # (zp, k, c)
            per_degree.append(torch.matmul(u.reshape(m * q, k), wz).view(zp, m, q, c))
        per_output.append(torch.cat(per_degree, 2))
    return torch.cat(per_output, 1).permute(0, 3, 1, 2).contiguous()
