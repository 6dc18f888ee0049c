"""Torch reference of the channelwise ('uvu') tensor product and of the fused
convolution (gather senders, product, sum over each receiver's edges). Paths sharing an
input block of x1 are computed together: one contraction of x2 with their stacked
Clebsch-Gordan blocks, then the products with x1."""

from __future__ import annotations

import itertools
from typing import List, NamedTuple, Optional, Tuple

import torch

from ...paths import OutputSlots, split_segments
from ..descriptors import TPDesc
from ..grads import needed, track
from ..tensor_cache import cached
from .opaque import opaque_to_compile
from .take import Take


def _groups(desc: TPDesc) -> List[Tuple[int, List[int]]]:
    """Paths grouped by their x1 block, in order of first appearance."""
    groups = {}
    for t, p in enumerate(desc.paths):
        groups.setdefault(p.i_in, []).append(t)
    return list(groups.items())


def _cg_blocks(desc: TPDesc) -> List[torch.Tensor]:
    """For each x1 block: C of shape (dim2, d1 * K), K = sum of the paths' d_out. Built
    by the first forward, so from the descriptor's integers (traced when that forward
    runs under torch.compile)."""
    blocks = []
    b2, d_out = desc.blocks_in2, desc.blocks_out.dims
    for i1, ts in _groups(desc):
        d1 = desc.blocks_in1.dims[i1]
        k_total = sum(d_out[desc.paths[t].i_out] for t in ts)
        c = torch.zeros(b2.dim, d1, k_total, dtype=torch.float64)
        k = 0
        for t in ts:
            p = desc.paths[t]
            c[b2.slice(p.i_in2), :, k:k + d_out[p.i_out]] = p.scale * desc.cg(*desc.ls(p)).transpose(0, 1)
            k += d_out[p.i_out]
        blocks.append(c.reshape(b2.dim, d1 * k_total))
    return blocks


def channelwise_tp(desc: TPDesc, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-edge messages (E, irreps_out.dim)."""
    e = x1.shape[0]
    cg = desc.const("cg", x1, lambda: _cg_blocks(desc))
    # split, not slicing: their backward is one concatenation, not a zero-filled
    # full-size gradient per slice
    x1_blocks = x1.split(desc.blocks_in1.sizes, dim=1)
    w_paths = split_segments(weight, [(p.weight_offset, p.mul_in) for p in desc.paths], dim=1)
    out = OutputSlots(desc.blocks_out.sizes)
    for (i1, ts), c in zip(desc.const("groups", x1, lambda: _groups(desc)), cg):
        mul, d1 = desc.blocks_in1.muls[i1], desc.blocks_in1.dims[i1]
        z = torch.matmul(x2, c).view(e, d1, c.shape[1] // d1)  # (E, d1, K)
        xi = x1_blocks[i1].reshape(e, mul, d1)
        dims = [desc.blocks_out.dims[desc.paths[t].i_out] for t in ts]
        for t, zt in zip(ts, z.split(dims, dim=2)):
            # weight the small (E, mul, d1) operand first, then one pass over the
            # (E, mul, d_out) output; broadcast products beat batched GEMMs with
            # inner dimension d1 <= 7 on CPUs
            wx = xi * w_paths[t].unsqueeze(-1)
            y = wx[:, :, 0, None] * zt[:, None, 0, :]
            for i in range(1, d1):
                y = y + wx[:, :, i, None] * zt[:, None, i, :]
            out.add(desc.paths[t].i_out, y.reshape(e, mul * zt.shape[2]))
    return out.cat(x1)


@opaque_to_compile  # the receivers' in-degrees are read on the host
def conv(desc: TPDesc, node_feats: torch.Tensor, edge_attrs: torch.Tensor, tp_weights: torch.Tensor,
         edge_index: torch.Tensor) -> torch.Tensor:
    """sum over edges e with receiver(e) = n of the product of node_feats[sender(e)];
    ``edge_index[0]`` holds senders, ``edge_index[1]`` receivers."""
    n = node_feats.shape[0]
    sender, receiver = edge_index[0].long(), edge_index[1].long()
    # planned once a graph: every conv layer and pass of it reuses the plan
    slots = cached(edge_index, ("receiver_slots", n), lambda: _receiver_slots(receiver, n))
    if slots is None:
        messages = channelwise_tp(desc, node_feats.index_select(0, sender), edge_attrs, tp_weights)
        return messages.new_zeros(n, messages.shape[1]).index_add(0, receiver, messages)
    # the edges' rows in slot order, 0 in the padding: a gather whose gradient is one too
    w, x2 = (Take.apply(t, 0, slots.index, slots.pads, slots.inverse, None) for t in (tp_weights, edge_attrs))
    # each x1 block as (nodes, d1, mul), gathered apiece: P then comes out of one broadcast
    # product already in the (e, i, u) order the batched product reads, and each block's
    # gradient is scattered into it, not concatenated at the edges' size first
    b1 = desc.blocks_in1
    x1_t = [b.reshape(b.shape[0], mul, d).transpose(1, 2).reshape(b.shape[0], mul * d)
            for b, mul, d in zip(node_feats.split(b1.sizes, dim=1), b1.muls, b1.dims)]
    sizes = [rows * width for rows, width in slots.shapes]
    parts = zip(*(_pieces(t, sizes) for t in (w, x2, sender.index_select(0, slots.index))), slots.shapes)
    y = torch.cat([_conv_by_receiver(desc, x1_t, *part) for part in parts])
    return y.new_zeros(n, y.shape[1]).index_copy(0, slots.nodes, y)  # nodes without edges stay 0


def _pieces(t: torch.Tensor, sizes: List[int]) -> Tuple[torch.Tensor, ...]:
    """t split into row blocks; one block is t itself (a split's backward copies)."""
    return (t,) if len(sizes) == 1 else t.split(sizes)


def _conv_by_receiver(desc: TPDesc, x1_t, w, x2, sender, shape: Tuple[int, int]):
    """The sum over a node's incoming edges done inside one batched product per path,
    out[n, u, k] = sum_(e, i) P[n, (e, i), u] Z[n, (e, i), k] with P = w x1[sender] and
    Z = C x2, so the (edges, mul, d_out) messages are never formed. ``shape`` is
    (nodes, width): w, x2 and sender hold their incoming edges in width slots a node, x2
    and w zero in a padding slot (so are Z and every product with it, and their
    gradients); x1_t holds each x1 block's (d1, mul) transpose, for every node."""
    n, width = shape
    cg = desc.const("cg", w, lambda: _cg_blocks(desc))
    b1 = desc.blocks_in1
    groups = desc.const("groups", w, lambda: _groups(desc))
    xs = [x1_t[i1].index_select(0, sender).view(n * width, b1.dims[i1], b1.muls[i1]) for i1, _ in groups]
    ps = iter(_ScaleRows.apply(desc.const("row_paths", w, lambda: _RowPaths.of(desc)), w, *xs))
    out = OutputSlots(desc.blocks_out.sizes)
    for (i1, ts), c in zip(groups, cg):
        mul, d1 = b1.muls[i1], b1.dims[i1]
        z = torch.matmul(x2, c).view(n, width * d1, c.shape[1] // d1)  # (n, (e, i), K)
        dims = [desc.blocks_out.dims[desc.paths[t].i_out] for t in ts]
        for t, zt, pt in zip(ts, z.split(dims, dim=2), ps):
            pt = pt.view(n, width * d1, mul)
            # (n, d_out, mul), transposed after: the gradient of pt then comes out of its
            # product contiguous (no copy in the view's backward), the small output is copied
            y = torch.bmm(zt.transpose(1, 2), pt)
            out.add(desc.paths[t].i_out, y.transpose(1, 2).reshape(n, mul * zt.shape[2]))
    return out.cat(w.new_empty(n, 0))  # n rows, for output blocks no path writes


class _RowPaths(NamedTuple):
    """The paths of a conv for :class:`_ScaleRows`, in the order of their x1 groups: for
    each, its group and its columns in w, ``(group, offset, mul)``."""

    groups: int
    columns: int  # w's
    paths: Tuple[Tuple[int, int, int], ...]
    covered: bool  # every column of w is some path's

    @staticmethod
    def of(desc: TPDesc) -> "_RowPaths":
        groups = _groups(desc)
        paths = tuple((g, desc.paths[t].weight_offset, desc.paths[t].mul_in)
                      for g, (_, ts) in enumerate(groups) for t in ts)
        covered = len({c for _, off, mul in paths for c in range(off, off + mul)}) == desc.weight_numel
        return _RowPaths(len(groups), desc.weight_numel, paths, covered)


class _RowFunction(torch.autograd.Function):
    """What :class:`_ScaleRows`, :class:`_ScaleSum` and :class:`_RowDot` keep for their
    backward: the spec and every tensor argument (``setup_context`` apart: ``torch.func``
    needs it)."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        track(ctx, *inputs)
        ctx.spec = inputs[0]
        ctx.save_for_backward(*inputs[1:])


class _ScaleRows(_RowFunction):
    """p_t[b, i, u] = x_g[b, i, u] w[b, c_t + u] for each path t (group g, columns c_t of
    the whole per-edge weight w). With :class:`_ScaleSum` and :class:`_RowDot` it is closed
    under differentiation (each one's backward is made of the three), so every order of
    derivative is a few fused passes: x's gradient sums a group's paths by fused
    multiply-adds, not one product and one addition a path; w's is written column block by
    column block into one tensor, where the paths' pieces of w would be concatenated, and
    each reduces over the short axis i, where autograd's broadcast backward reduces over a
    middle axis, several times slower on CPUs."""

    @staticmethod
    def forward(spec: _RowPaths, w: torch.Tensor, *xs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(xs[g] * w.narrow(1, off, mul).unsqueeze(1) for g, off, mul in spec.paths)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        w, *xs = ctx.saved_tensors
        grad_w = _RowDot.apply(ctx.spec, *grads, *xs) if needed(ctx, 1) else None
        wanted = any(needed(ctx, 2 + g) for g in range(len(xs)))
        return (None, grad_w, *(_ScaleSum.apply(ctx.spec, w, *grads) if wanted else (None,) * len(xs)))


class _ScaleSum(_RowFunction):
    """s_g[b, i, u] = sum over the paths t of group g of g_t[b, i, u] w[b, c_t + u]."""

    @staticmethod
    def forward(spec: _RowPaths, w: torch.Tensor, *gs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        sums: List[Optional[torch.Tensor]] = [None] * spec.groups
        for (g, off, mul), gt in zip(spec.paths, gs):
            wt = w.narrow(1, off, mul).unsqueeze(1)
            sums[g] = gt * wt if sums[g] is None else sums[g].addcmul_(gt, wt)
        return tuple(sums)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        w, *gs = ctx.saved_tensors
        grad_w = _RowDot.apply(ctx.spec, *gs, *grads) if needed(ctx, 1) else None
        wanted = any(needed(ctx, 2 + t) for t in range(len(gs)))
        return (None, grad_w, *(_ScaleRows.apply(ctx.spec, w, *grads) if wanted else (None,) * len(gs)))


class _RowDot(_RowFunction):
    """r[b, c_t + u] = sum_i a_t[b, i, u] x_g[b, i, u] for each path t of group g,
    arguments (a_1..a_T, x_1..x_G): by fused multiply-adds over the short axis i, into
    one (rows, w's columns) tensor."""

    @staticmethod
    def forward(spec: _RowPaths, *args: torch.Tensor) -> torch.Tensor:
        a_s, xs = args[:len(spec.paths)], args[len(spec.paths):]
        rows = a_s[0].shape[0]
        r = a_s[0].new_empty(rows, spec.columns) if spec.covered else a_s[0].new_zeros(rows, spec.columns)
        for (g, off, mul), a in zip(spec.paths, a_s):
            out = r.narrow(1, off, mul)
            # unbind, not a[:, i]: views of the rows, no copies
            pairs = zip(a.unbind(1), xs[g].unbind(1))
            torch.mul(*next(pairs), out=out)
            for a_i, x_i in pairs:
                out.addcmul_(a_i, x_i)
        return r

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        spec, args = ctx.spec, ctx.saved_tensors
        a_s, xs = args[:len(spec.paths)], args[len(spec.paths):]
        grad_a = _ScaleRows.apply(spec, grad, *xs) if any(needed(ctx, 1 + t) for t in range(len(a_s))) else None
        grad_x = (_ScaleSum.apply(spec, grad, *a_s)
                  if any(needed(ctx, 1 + len(a_s) + g) for g in range(len(xs))) else None)
        return (None, *(grad_a or (None,) * len(a_s)), *(grad_x or (None,) * len(xs)))


class _Slots(NamedTuple):
    """Every edge in a slot of its receiver, nodes grouped by in-degree (one width a
    group): slot p of the (sum of rows x width) holds edge ``index[p]``, ``pads`` the
    empty slots (their index is any edge), ``inverse[e]`` edge e's slot."""

    nodes: torch.Tensor  # the groups' nodes in order (nodes without edges in none)
    shapes: List[Tuple[int, int]]  # (nodes, width) of each group
    index: torch.Tensor
    pads: Optional[torch.Tensor]
    inverse: torch.Tensor


# A group's fixed cost in edge slots (its gathers and products are issued once a group,
# in every pass): `benchmarks/conv_groups.py` on a 2-core CPU puts it at 77-270 slots for
# the MACE-MP-0-medium shape, 160-373 for SevenNet-0 (results/conv_groups_2026-12-06.md)
GROUP_COST = 200


def _groups_by_degree(degrees: List[int], group_cost: int) -> List[Tuple[int, int]]:
    """(nodes, width) of each group of the nodes in order of descending in-degree, each
    group as wide as its first node's in-degree: the split into consecutive groups that
    costs least, every slot 1 and every group ``group_cost`` (over runs of equal
    degree: a split inside one never pays)."""
    runs = [(d, len(list(same))) for d, same in itertools.groupby(d for d in degrees if d > 0)]
    ends = list(itertools.accumulate(count for _, count in runs))
    starts = [0] + ends[:-1]
    best, cut = [0] + [None] * len(runs), [0] * (len(runs) + 1)
    for j in range(1, len(runs) + 1):
        best[j], cut[j] = min((best[i] + (ends[j - 1] - starts[i]) * runs[i][0] + group_cost, i) for i in range(j))
    shapes, j = [], len(runs)
    while j:
        i = cut[j]
        shapes.append((ends[j - 1] - starts[i], runs[i][0]))
        j = i
    return shapes[::-1]


def _receiver_slots(receiver: torch.Tensor, n: int) -> Optional[_Slots]:
    """Nodes grouped by in-degree (:func:`_groups_by_degree`); None without edges."""
    e = receiver.shape[0]
    if e == 0:
        return None
    counts = torch.bincount(receiver, minlength=n)
    node_order = torch.argsort(counts, descending=True, stable=True)
    shapes = _groups_by_degree(counts.index_select(0, node_order).tolist(), GROUP_COST)
    order = torch.argsort(receiver, stable=True)
    ordered = receiver.index_select(0, order)
    position = torch.arange(e, device=receiver.device) - (torch.cumsum(counts, 0) - counts).index_select(0, ordered)
    # each node's first slot: its row in its group times the width, past the groups before
    first = torch.empty_like(counts)
    lo = offset = 0
    for rows, width in shapes:
        first[node_order[lo:lo + rows]] = offset + width * torch.arange(rows, device=receiver.device)
        lo, offset = lo + rows, offset + rows * width
    slot = first.index_select(0, ordered) + position  # of the edges in receiver order
    inverse = torch.empty_like(order).index_copy_(0, order, slot)
    index = torch.zeros(offset, dtype=torch.long, device=receiver.device).index_copy_(0, slot, order)
    pads = None
    if offset > e:
        filled = torch.zeros(offset, dtype=torch.bool, device=receiver.device).index_fill_(0, slot, True)
        pads = (~filled).nonzero().squeeze(1)
    return _Slots(node_order[:lo], shapes, index, pads, inverse)
