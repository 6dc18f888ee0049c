"""Trainable deltas on frozen path weights. Each module returns the dense delta of one
parameter, flattened (the torch back end adds it to W0; GPU kernels read the active
blocks instead). Any pattern of zeros keeps equivariance: every weight multiplies all
2l+1 components of one channel of one path alike."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import List, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from ..delta_slot import Delta
from ..paths import WeightGroup


def soft_threshold(v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """S(V, tau) = sign(V) max(|V| - tau, 0): exact zeros below the threshold."""
    return torch.sign(v) * torch.relu(v.abs() - tau)


class ThresholdDelta(Delta):
    """STR (tile (1, 1): element-wise soft threshold, the paper) or block mode (group
    soft threshold V_b max(1 - tau / rms(V_b), 0) over tiles, or whole paths).
    tau = exp(log_tau + tau_shift): log_tau is learned per parameter, tau_shift is set
    by the density controller for the whole model, so the allocation across layers is
    learned while the total density stays on target. ``pinned``: entries held at exactly
    zero (those of elements absent from the training data), which density does not count."""

    pinned = 0  # (class default: deltas pickled before it existed)

    def __init__(self, groups, numel: int, base: torch.Tensor, tile, init_scale: float,
                 generator: torch.Generator, elements: int = 0) -> None:
        super().__init__(groups, numel, elements)
        scale = init_scale * (base.detach().float().std().item() if base.numel() > 1 else 1.0) or init_scale
        v = torch.randn(numel, generator=generator, dtype=torch.float64) * scale
        self.v = torch.nn.Parameter(v.to(dtype=base.dtype, device=base.device))
        self.log_tau = torch.nn.Parameter(torch.tensor(math.log(scale), dtype=base.dtype, device=base.device))
        self.register_buffer("tau_shift", torch.zeros((), dtype=base.dtype, device=base.device))
        self.tile = tile
        self.steps = 0  # training forwards so far: where the density schedule is (a host int, no sync)
        self._pending = None  # (value, stamp) from prepare_values, for the coming forward

    _pending = None

    def __getstate__(self):  # a prepared value holds an autograd graph: not copied, not saved
        return {**super().__getstate__(), "_pending": None}

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state["steps"])

    def tau(self) -> torch.Tensor:
        return torch.exp(self.log_tau + self.tau_shift)

    def forward(self) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is not None and pending[1] == self._stamp():
            return pending[0]
        if self.tile == (1, 1):
            return soft_threshold(self.v, self.tau())
        return self._blockwise(self.tau())

    def _stamp(self) -> tuple:
        """What a prepared value was computed from: reused only while it is unchanged."""
        return (torch.is_grad_enabled(), *((t.data_ptr(), t._version) for t in (self.v, self.log_tau, self.tau_shift)))

    def _tiles(self, g: WeightGroup):
        _, r, c = g.shape
        return (r, c) if self.tile == "path" else (min(self.tile[0], r), min(self.tile[1], c))

    def _tile_rms(self, vg: torch.Tensor, tr: int, tc: int) -> torch.Tensor:
        """RMS of each (tr, tc) tile of a (G, R, C) view (ragged edge tiles counted right),
        at least sqrt(tiny): an all-zero tile (an absent element's, pinned) would give the
        square root's infinite slope times 0, a NaN gradient."""
        g, r, c = vg.shape
        pr, pc = (-r) % tr, (-c) % tc
        sq = torch.nn.functional.pad(vg * vg, (0, pc, 0, pr)).view(g, (r + pr) // tr, tr, (c + pc) // tc, tc)
        ones = torch.nn.functional.pad(torch.ones(r, c, dtype=vg.dtype, device=vg.device), (0, pc, 0, pr))
        count = ones.view((r + pr) // tr, tr, (c + pc) // tc, tc).sum((1, 3))
        return (sq.sum((2, 4)) / count).clamp_min(torch.finfo(vg.dtype).tiny).sqrt()

    def _expand(self, per_tile: torch.Tensor, tr: int, tc: int, r: int, c: int) -> torch.Tensor:
        return per_tile.repeat_interleave(tr, 1).repeat_interleave(tc, 2)[:, :r, :c]

    def _blockwise(self, tau: torch.Tensor) -> torch.Tensor:
        pieces = []
        for g in self.groups:
            vg = g.view(self.v)
            tr, tc = self._tiles(g)
            rms = self._tile_rms(vg, tr, tc)
            factor = torch.relu(1 - tau / rms)
            pieces.append(g.flatten(vg * self._expand(factor, tr, tc, g.shape[1], g.shape[2])))
        return _assemble(self.groups, pieces, self.v, self.numel)

    def scores(self) -> torch.Tensor:
        """Per weight entry: log of the magnitude the threshold is compared with, minus
        log_tau. An entry changes iff score > tau_shift (used to calibrate the shift)."""
        return scores_of([self])

    def _tile_magnitudes(self) -> torch.Tensor:
        parts = []
        for g in self.groups:
            tr, tc = self._tiles(g)
            rms = self._tile_rms(g.view(self.v), tr, tc)
            parts.append(g.flatten(self._expand(rms, tr, tc, g.shape[1], g.shape[2])))
        return _assemble(self.groups, parts, self.v, self.numel)


def _elementwise(deltas: Sequence[ThresholdDelta]) -> List[List[ThresholdDelta]]:
    """The element-wise (STR) deltas among ``deltas``, by device and dtype: each list one
    set of multi-tensor (``_foreach``) ops."""
    groups = defaultdict(list)
    for d in deltas:
        if d.tile == (1, 1):
            groups[d.v.device, d.v.dtype].append(d)
    return list(groups.values())


@torch.no_grad()
def scores_of(deltas: Sequence[ThresholdDelta]) -> torch.Tensor:
    """The ``deltas``' scores (:meth:`ThresholdDelta.scores`) one after another, in their
    dtype (the threshold compares in it: float32 scores let float64 entries tied or within
    half a float32 ulp of the k-th pass it); a fixed number of ops for all the element-wise
    ones (the density controller asks before every training step)."""
    scores = {}
    for group in _elementwise(deltas):
        mags = torch._foreach_abs([d.v for d in group])
        torch._foreach_clamp_min_(mags, torch.finfo(group[0].v.dtype).tiny)
        torch._foreach_log_(mags)
        torch._foreach_sub_(mags, [d.log_tau for d in group])
        scores.update(zip(map(id, group), mags))
    for d in deltas:
        if id(d) not in scores:
            mag = d._tile_magnitudes()
            scores[id(d)] = torch.log(mag.clamp_min(torch.finfo(mag.dtype).tiny)) - d.log_tau
    return torch.cat([scores[id(d)] for d in deltas])


def counted(deltas: Sequence[ThresholdDelta]) -> int:
    """How many of the ``deltas``' scores density counts: all but the pinned entries."""
    return sum(d.numel - d.pinned for d in deltas)


def prepare_values(deltas: Sequence[ThresholdDelta]) -> None:
    """Compute the element-wise ``deltas``' values for the coming forward pass together,
    each taken once by its layer (then computed afresh, as is one whose parameters changed
    since): on a sparse MACE-MP-0 step, 29 deltas in 17 host ops forward and backward
    instead of about 22 each (benchmarks/host_ops.py)."""
    for group in _elementwise(deltas):
        values = _SoftThresholds.apply(_lengths(tuple(d.numel for d in group), group[0].v.device),
                                       [d.tau_shift for d in group], *[d.v for d in group],
                                       *[d.log_tau for d in group])
        for d, value in zip(group, values):
            d._pending = (value, d._stamp())


@functools.lru_cache(maxsize=None)  # a few ints per model: never evicted, so never copied to a GPU again
def _lengths(numels: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(numels, device=device)


class _SoftThresholds(torch.autograd.Function):
    """:func:`soft_threshold` of many deltas, tau = exp(log_tau + tau_shift) each, by
    multi-tensor ops; the same values and gradients as one delta at a time."""

    @staticmethod
    def forward(ctx, lengths: torch.Tensor, shifts: List[torch.Tensor], *params: torch.Tensor):
        n = len(params) // 2
        vs, log_taus = params[:n], params[n:]
        tau = torch._foreach_exp(torch._foreach_add(log_taus, shifts))
        mag = torch._foreach_sub(torch._foreach_abs(vs), tau)
        torch._foreach_maximum_(mag, 0.0)  # relu
        out = torch._foreach_mul(torch._foreach_sign(vs), mag)
        # intermediates (no graph) kept on ctx: saved tensors cost an op each to unpack
        ctx.signs, ctx.tau, ctx.lengths = torch._foreach_sign(out), torch.stack(tau), lengths
        ctx.set_materialize_grads(False)  # a value no layer used: no gradient, as one at a time
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[torch.Tensor]):
        signs = ctx.signs  # sign(v) where |v| > tau, else 0
        used = [g is not None for g in grads]
        grads = [g if g is not None else torch.zeros_like(s) for g, s in zip(grads, signs)]
        dv = torch._foreach_mul(grads, torch._foreach_abs(signs))
        sums = signed_sums(grads, signs, ctx.lengths, segmented=grads[0].device.type != "cpu")
        dlog_tau = ctx.tau.mul(sums).neg().unbind()  # d out / d log_tau = -sign(v) [|v| > tau] tau
        return (None, None, *(d if u else None for d, u in zip(dv, used)),
                *(d if u else None for d, u in zip(dlog_tau, used)))


class FixedDelta(Delta):
    """Fast mode, and loaded adapters: only the active entries are stored and trained;
    gradients and optimizer state scale with them, not with the model."""

    def __init__(self, groups, numel: int, index: torch.Tensor, values: torch.Tensor,
                 trainable: bool = True, elements: int = 0) -> None:
        super().__init__(groups, numel, elements)
        self.register_buffer("index", index.to(torch.int64))
        self.values = torch.nn.Parameter(values.clone(), requires_grad=trainable)

    def forward(self) -> torch.Tensor:
        return self.values.new_zeros(self.numel).index_put((self.index,), self.values)


class LoRADelta(Delta):
    """Equivariant LoRA (the baseline): A_g B_g of rank r for every path block and
    element; A random, B zero, so training starts at the base model."""

    def __init__(self, groups, numel: int, base: torch.Tensor, rank: int, alpha: float,
                 generator: torch.Generator, elements: int = 0) -> None:
        super().__init__(groups, numel, elements)
        self.a = torch.nn.ParameterList()
        self.b = torch.nn.ParameterList()
        self.scale = alpha / rank
        for g in groups:
            n, r, c = g.shape
            k = min(rank, r, c)
            a = torch.randn(n, r, k, generator=generator, dtype=torch.float64) / math.sqrt(r)
            self.a.append(torch.nn.Parameter(a.to(dtype=base.dtype, device=base.device)))
            self.b.append(torch.nn.Parameter(torch.zeros(n, k, c, dtype=base.dtype, device=base.device)))

    def forward(self) -> torch.Tensor:
        pieces = [g.flatten(torch.bmm(a, b) * self.scale) for g, a, b in zip(self.groups, self.a, self.b)]
        return _assemble(self.groups, pieces, self.a[0], self.numel)


def _assemble(groups: Sequence[WeightGroup], pieces, like: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat delta from the groups' flattened pieces (zeros between and after groups)."""
    ordered = sorted(zip(groups, pieces), key=lambda gp: gp[0].offset)
    parts, pos = [], 0
    for g, piece in ordered:
        if g.offset > pos:
            parts.append(like.new_zeros(g.offset - pos))
        parts.append(piece)
        pos = g.offset + g.numel
    if pos < numel:
        parts.append(like.new_zeros(numel - pos))
    return torch.cat(parts)


def signed_sums(grads: Sequence[torch.Tensor], signs: Sequence[torch.Tensor], lengths: torch.Tensor,
                segmented: bool) -> torch.Tensor:
    """sum(g * s) of each pair: off the CPU one segmented sum (a fixed number of ops, which
    the GPU would otherwise wait on), on it dot products (multithreaded, no copy: 0.8 ms
    against 6 ms for MACE-MP-0 medium's 4.7 M entries on 2 cores; CPU ops wait on no host)."""
    if segmented:
        return torch.segment_reduce(torch.cat(torch._foreach_mul(grads, signs)), "sum", lengths=lengths)
    return torch.stack([torch.dot(g, s) for g, s in zip(grads, signs)])
