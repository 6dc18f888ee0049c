"""Channelwise 'uvu' tensor product with external per-edge weights (MACE's and
SevenNet's ``conv_tp``), and the fused convolution that gathers senders and
scatters to receivers (the ``conv_fusion`` contract of MACE)."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from e3nn import o3

from .base import SparsekernLayer, split_segments
from .linear import _cat_slots


class TPPath(NamedTuple):
    i_in1: int
    i_in2: int
    i_out: int
    mul: int
    path_weight: float
    weight_offset: int


class ChannelwiseTP(SparsekernLayer):
    """out[e, path, u, k] = path_weight * w[e, path, u] * sum_ij C[i, j, k] x1[e, u, i] x2[e, j]

    with C e3nn's ``wigner_3j``. Paths sharing an input block of x1 are computed
    together: one contraction of x2 with their stacked Clebsch-Gordan blocks, then
    one batched matrix product with x1."""

    implemented_backends = ("torch", "triton")

    def __init__(self, irreps_in1, irreps_in2, irreps_out, instructions):
        super().__init__()
        self._init_from(o3.TensorProduct(irreps_in1, irreps_in2, irreps_out, instructions,
                                         shared_weights=False, internal_weights=False))

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module) -> Optional[str]:
        if module.internal_weights or module.shared_weights:
            return "internal or shared weights (expected per-edge external weights)"
        for ins in module.instructions:
            if ins.connection_mode != "uvu" or not ins.has_weight:
                return f"instruction mode {ins.connection_mode!r} (only weighted 'uvu' is supported)"
            if o3.Irreps(module.irreps_in2)[ins.i_in2].mul != 1:
                return "second operand with multiplicity > 1"
        return None

    def _init_from(self, ref) -> None:
        self.irreps_in1 = o3.Irreps(ref.irreps_in1)
        self.irreps_in2 = o3.Irreps(ref.irreps_in2)
        self.irreps_out = o3.Irreps(ref.irreps_out)
        paths: List[TPPath] = []
        offset = 0
        for ins in ref.instructions:
            mul = self.irreps_in1[ins.i_in1].mul
            if mul and self.irreps_in2[ins.i_in2].dim and self.irreps_out[ins.i_out].dim:
                paths.append(TPPath(ins.i_in1, ins.i_in2, ins.i_out, mul, float(ins.path_weight), offset))
            offset += mul
        self.paths = paths
        self.weight_numel = offset
        self._replaced = ref
        # Group paths by their x1 block; for each group, the column range of each path
        # in the stacked output index K.
        groups = {}
        for t, p in enumerate(self.paths):
            groups.setdefault(p.i_in1, []).append(t)
        self.groups = list(groups.items())
        self._w3j = _module_w3j(ref)

    def _cg_blocks(self):
        """For each x1 block: C of shape (dim2, d1 * K), K = sum of the paths' d_out."""
        blocks = []
        s2 = self.irreps_in2.slices()
        for i1, ts in self.groups:
            l1 = self.irreps_in1[i1].ir.l
            d1 = 2 * l1 + 1
            k_total = sum(self.irreps_out[self.paths[t].i_out].ir.dim for t in ts)
            c = torch.zeros(self.irreps_in2.dim, d1, k_total, dtype=torch.float64)
            k = 0
            for t in ts:
                p = self.paths[t]
                l2, lo = self.irreps_in2[p.i_in2].ir.l, self.irreps_out[p.i_out].ir.l
                w3j = self._cg(l1, l2, lo)  # (d1, d2, d_out)
                c[s2[p.i_in2], :, k:k + 2 * lo + 1] = p.path_weight * w3j.transpose(0, 1)
                k += 2 * lo + 1
            blocks.append(c.reshape(self.irreps_in2.dim, d1 * k_total))
        return blocks

    def _cg(self, l1: int, l2: int, lo: int) -> torch.Tensor:
        """The coefficients e3nn itself uses: exact identities where its specialised code
        skips wigner_3j (an l = 0 operand), otherwise the module's own w3j buffer (a
        float32-built model moved to float64 keeps float32-rounded values)."""
        if 0 in (l1, l2, lo):
            d = 2 * max(l1, l2, lo) + 1
            eye = torch.eye(d, dtype=torch.float64) / d ** 0.5  # two of the three dims are d
            return eye.reshape(2 * l1 + 1, 2 * l2 + 1, 2 * lo + 1)
        w3j = self._w3j.get((l1, l2, lo))
        return w3j if w3j is not None else o3.wigner_3j(l1, l2, lo, dtype=torch.float64)

    def _check(self, x1, x2, weight, n1: int) -> None:
        self._check_features(x1, self.irreps_in1.dim, "x1")
        self._check_features(x2, self.irreps_in2.dim, "x2")
        self._check_same(x1, x2, "x2")
        self._check_same(x1, weight, "weight")
        if weight.shape != (x2.shape[0], self.weight_numel):
            raise ValueError(
                f"{type(self).__name__}: weight must have shape ({x2.shape[0]}, {self.weight_numel}), "
                f"got {tuple(weight.shape)}")
        if x1.dim() != 2 or x2.dim() != 2 or x1.shape[0] != n1:
            raise ValueError(f"{type(self).__name__}: x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} must be "
                             f"2-D with {n1} and {x2.shape[0]} rows")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self._check(x1, x2, weight, x2.shape[0])
        if self.backend == "triton":
            from ..kernels.triton import channelwise_tp

            return channelwise_tp(self, x1, x2, weight)
        return self._messages(x1, x2, weight)

    def _messages(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        e = x1.shape[0]
        cg = self._const("cg", x1, self._cg_blocks)
        # split, not slicing: their backward is one concatenation, not a zero-filled
        # full-size gradient per slice
        x1_blocks = x1.split([mul_ir.dim for mul_ir in self.irreps_in1], dim=1)
        w_paths = split_segments(weight, [(p.weight_offset, p.mul) for p in self.paths], dim=1)
        outs: List[Optional[torch.Tensor]] = [None] * len(self.irreps_out)
        for (i1, ts), c in zip(self.groups, cg):
            mul, d1 = self.irreps_in1[i1].mul, self.irreps_in1[i1].ir.dim
            z = torch.matmul(x2, c).view(e, d1, c.shape[1] // d1)  # (E, d1, K)
            xi = x1_blocks[i1].reshape(e, mul, d1)
            dims = [self.irreps_out[self.paths[t].i_out].ir.dim for t in ts]
            for t, zt in zip(ts, z.split(dims, dim=2)):
                p = self.paths[t]
                # weight the small (E, mul, d1) operand first, then one pass over the
                # (E, mul, d_out) output; broadcast products beat batched GEMMs with
                # inner dimension d1 <= 7 on CPUs
                wx = xi * w_paths[t].unsqueeze(-1)
                y = wx[:, :, 0, None] * zt[:, None, 0, :]
                for i in range(1, d1):
                    y = y + wx[:, :, i, None] * zt[:, None, i, :]
                y = y.reshape(e, mul * zt.shape[2])
                outs[p.i_out] = y if outs[p.i_out] is None else outs[p.i_out] + y
        return _cat_slots(outs, self.irreps_out, x1)

    def to_e3nn(self):
        return self.to_replaced()

    def extra_repr(self) -> str:
        return (f"{self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out}, {len(self.paths)} paths, "
                f"weight_numel={self.weight_numel}, backend={self.backend}")


def _module_w3j(module: torch.nn.Module):
    """Wigner 3j buffers of an e3nn tensor product, by (l1, l2, l_out), in float64."""
    found = {}
    for name, buf in module.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("_w3j_"):
            l1, l2, lo = (int(v) for v in leaf[len("_w3j_"):].split("_"))
            found[(l1, l2, lo)] = buf.detach().to("cpu", torch.float64)
    return found


class ChannelwiseConv(ChannelwiseTP):
    """Fused convolution: ``forward(node_feats, edge_attrs, tp_weights, edge_index)``
    returns sum over edges e with receiver(e) = n of the channelwise product of
    node_feats[sender(e)]; ``edge_index[0]`` holds senders, ``edge_index[1]`` receivers."""

    def forward(self, node_feats, edge_attrs, tp_weights, edge_index):  # type: ignore[override]
        n = node_feats.shape[0]
        if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.shape[1] != edge_attrs.shape[0]:
            raise ValueError(f"ChannelwiseConv: edge_index must have shape (2, {edge_attrs.shape[0]}), "
                             f"got {tuple(edge_index.shape)}")
        if edge_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ChannelwiseConv: edge_index must be an integer tensor, got {edge_index.dtype}")
        self._check(node_feats, edge_attrs, tp_weights, n)
        if self.backend == "triton":
            from ..kernels.triton import conv_fused

            return conv_fused(self, node_feats, edge_attrs, tp_weights, edge_index)
        sender, receiver = edge_index[0].long(), edge_index[1].long()
        buckets = _receiver_buckets(receiver, n)
        if buckets:
            outs = [self._conv_by_receiver(node_feats, edge_attrs, tp_weights, sender, slots, padded)
                    for _, slots, padded in buckets]
            nodes = torch.cat([b[0] for b in buckets])
            y = torch.cat(outs)
            return y.new_zeros(n, y.shape[1]).index_copy(0, nodes, y)  # nodes without edges stay 0
        messages = self._messages(node_feats.index_select(0, sender), edge_attrs, tp_weights)
        out = messages.new_zeros(n, messages.shape[1])
        return out.index_add(0, receiver, messages)

    def _conv_by_receiver(self, node_feats, edge_attrs, tp_weights, sender, slots, padded: bool):
        """The sum over a node's incoming edges done inside one batched product per path,
        out[n, u, k] = sum_(e, i) P[n, (e, i), u] Z[n, (e, i), k] with P = w x1[sender] and
        Z = C x2, so the (edges, mul, d_out) messages are never formed. ``slots`` (n, width)
        lists the incoming edges of n nodes, ``padded`` with edge E (a zero weight row)."""
        n, width = slots.shape
        cg = self._const("cg", node_feats, self._cg_blocks)
        flat = slots.reshape(-1)
        rows = (tp_weights, edge_attrs, sender)
        if padded:
            rows = tuple(torch.cat([t, t.new_zeros((1,) + t.shape[1:])]) for t in rows)
        w_pad, x2_pad, s_pad = (t.index_select(0, flat) for t in rows)
        # each x1 block as (nodes, d1, mul) before the gather: P then comes out of one
        # broadcast product already in the (e, i, u) order the batched product reads
        x1_t = torch.cat([b.reshape(-1, mul_ir.mul, mul_ir.ir.dim).transpose(1, 2).reshape(b.shape[0], -1)
                          for b, mul_ir in zip(node_feats.split([m.dim for m in self.irreps_in1], dim=1),
                                               self.irreps_in1)], 1)
        x1_blocks = x1_t.index_select(0, s_pad).split([mul_ir.dim for mul_ir in self.irreps_in1], dim=1)
        w_paths = split_segments(w_pad, [(p.weight_offset, p.mul) for p in self.paths], dim=1)
        outs: List[Optional[torch.Tensor]] = [None] * len(self.irreps_out)
        for (i1, ts), c in zip(self.groups, cg):
            mul, d1 = self.irreps_in1[i1].mul, self.irreps_in1[i1].ir.dim
            z = torch.matmul(x2_pad, c).view(n, width * d1, c.shape[1] // d1)  # (n, (e, i), K)
            xi = x1_blocks[i1].reshape(n * width, d1, mul)
            dims = [self.irreps_out[self.paths[t].i_out].ir.dim for t in ts]
            for t, zt in zip(ts, z.split(dims, dim=2)):
                p = self.paths[t]
                pt = _ScaleRows.apply(xi, w_paths[t]).view(n, width * d1, mul)
                y = torch.bmm(pt.transpose(1, 2), zt).reshape(n, mul * zt.shape[2])
                outs[p.i_out] = y if outs[p.i_out] is None else outs[p.i_out] + y
        return _cat_slots(outs, self.irreps_out, node_feats)


class _ScaleRows(torch.autograd.Function):
    """p[b, i, u] = x[b, i, u] w[b, u]. The weight gradient sums over the short axis i by
    fused multiply-adds: autograd's broadcast backward reduces over that middle axis,
    several times slower on CPUs. The backward is built of differentiable operations,
    so double backward goes through it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x * w.unsqueeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_x = grad * w.unsqueeze(1) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad[:, 0] * x[:, 0]
            for i in range(1, x.shape[1]):
                grad_w = torch.addcmul(grad_w, grad[:, i], x[:, i])
        return grad_x, grad_w


def _receiver_buckets(receiver: torch.Tensor, n: int) -> List[Tuple[torch.Tensor, torch.Tensor, bool]]:
    """Nodes grouped by in-degree so that padding each group to its largest in-degree at
    most adds half of its edges: per group its nodes, their (nodes, width) incoming edge
    ids padded with E, and whether any padding is there. Nodes without edges are in no
    group; no groups without edges."""
    e = receiver.shape[0]
    if e == 0:
        return []
    counts = torch.bincount(receiver, minlength=n)
    node_order = torch.argsort(counts, descending=True, stable=True)
    degrees = counts.index_select(0, node_order).tolist()
    order = torch.argsort(receiver, stable=True)
    ordered = receiver.index_select(0, order)
    position = torch.arange(e, device=receiver.device) - (torch.cumsum(counts, 0) - counts).index_select(0, ordered)
    local = torch.empty_like(counts)  # each node's row in its group
    buckets, lo = [], 0
    while lo < n and degrees[lo] > 0:
        width, hi = degrees[lo], lo
        while hi < n and degrees[hi] > 0 and 3 * degrees[hi] >= 2 * width:
            hi += 1
        nodes = node_order[lo:hi]
        local[nodes] = torch.arange(hi - lo, device=receiver.device)
        mine = torch.zeros(n, dtype=torch.bool, device=receiver.device)
        mine[nodes] = True
        take = mine.index_select(0, ordered)
        slots = torch.full(((hi - lo) * width,), e, dtype=torch.long, device=receiver.device)
        slots[local.index_select(0, ordered[take]) * width + position[take]] = order[take]
        buckets.append((nodes, slots.view(hi - lo, width), sum(degrees[lo:hi]) < (hi - lo) * width))
        lo = hi
    return buckets
