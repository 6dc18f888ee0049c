"""A sparse delta whose entries are chosen by the training loss, not by a random start:
the path weights with the largest accumulated squared gradient at the base model (the
diagonal of the empirical Fisher information, as FISH masks do: Sung et al., NeurIPS
2021) get a trainable delta that starts at zero, so the model starts as the base.

Why: a thresholded delta's inactive entries get no gradient, so its active set stays
close to the random initial top-d % (benchmarks/NOTES.md, "the active set barely
moves"); at very low densities which entries change matters most."""

from __future__ import annotations

from typing import Callable, Iterable, List, Sequence, Tuple

import torch

from .. import delta_slot
from ..paths import WeightGroup
from .delta import FixedDelta


def fisher_scores(targets: List[Tuple[torch.nn.Module, str, List[WeightGroup]]],
                  losses: Iterable[Callable[[], torch.Tensor]]) -> List[torch.Tensor]:
    """Per target, the sum over ``losses`` (one per batch) of the squared gradient of the
    loss with respect to each entry of its groups, flattened in group order."""
    params = [layer.get_parameter(param) for layer, param, _ in targets]
    unique = list({id(p): p for p in params}.values())
    before = [p.requires_grad for p in unique]
    acc = [torch.zeros_like(p, dtype=torch.float64).view(-1) for p in params]
    try:
        for p in unique:
            p.requires_grad_(True)
        for loss_of in losses:
            grads = torch.autograd.grad(loss_of(), unique, allow_unused=True)
            by_id = {id(p): g for p, g in zip(unique, grads)}
            for a, p in zip(acc, params):
                g = by_id[id(p)]
                if g is not None:
                    a += g.detach().double().view(-1).square()
    finally:
        for p, b in zip(unique, before):
            p.requires_grad_(b)
    return [torch.cat([a.narrow(0, g.offset, g.numel) for g in groups])
            for a, (_, _, groups) in zip(acc, targets)]


def attach_salient(targets: List[Tuple[torch.nn.Module, str, List[WeightGroup]]], scores: List[torch.Tensor],
                   density: float, absent: Sequence[int] = ()) -> None:
    """Attach to each target a zero-valued trainable FixedDelta on its entries among the
    ``density`` fraction with the highest score over all targets, leaving out (never
    chosen, not counted) the entries of per-element weights of the ``absent`` elements."""
    masks = [_reachable(groups, absent) for _, _, groups in targets]
    flat = torch.cat([torch.where(m, s, -torch.inf) for m, s in zip(masks, scores)])
    keep = max(1, int(round(density * sum(int(m.sum()) for m in masks))))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    start = 0
    for (layer, param, groups), s in zip(targets, scores):
        mine = chosen[start:start + s.numel()]
        start += s.numel()
        offsets = torch.cat([torch.arange(g.offset, g.offset + g.numel) for g in groups])
        index = offsets[mine]
        base = layer.get_parameter(param)
        values = base.new_zeros(index.numel())
        delta_slot.attach(layer, param, FixedDelta(groups, base.numel(), index.to(base.device), values))


def _reachable(groups: Sequence[WeightGroup], absent: Sequence[int]) -> torch.Tensor:
    """Which entries of ``groups`` (in group order, flattened as ``fisher_scores``'s) are
    not of the ``absent`` elements."""
    parts = []
    for g in groups:
        mask = torch.ones(g.shape, dtype=torch.bool)
        if g.per_element:
            mask[list(absent)] = False
        parts.append(g.flatten(mask))
    return torch.cat(parts)
