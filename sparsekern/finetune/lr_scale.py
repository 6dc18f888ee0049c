"""Each sparse delta's entries at a learning rate of their own, set by the scale of the
base weight they change. Adam moves an entry by about lr per step whatever its
gradient, so one lr moves the entries of small weights (SevenNet-0's readout, std
0.1-0.2, against 0.9-2.7 elsewhere) much further relative to them. The factor is the
square root of the weight's std over the deltas' upper median: the full ratio helped
the molecules but starved silicon's readout, the square root keeps most of both
(benchmarks/NOTES.md, "0.5 % at parity", fourth and fifth rounds). The harness and
mace-train use it alike."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .. import delta_slot
from .delta import FixedDelta, ThresholdDelta


def entry_lr_factors(model: torch.nn.Module) -> Dict[int, Tuple[torch.nn.Parameter, float]]:
    """``id(entries) -> (entries, factor)`` for every trainable sparse delta's entries."""
    entries = {}
    for _, layer, param, delta in delta_slot.iter_deltas(model):
        p = delta.v if isinstance(delta, ThresholdDelta) else delta.values if isinstance(delta, FixedDelta) else None
        if p is not None and p.requires_grad:
            base = layer.get_parameter(param).detach()
            entries[id(p)] = (p, base.float().std().item() if base.numel() > 1 else 0.0)
    scales = sorted(scale for _, scale in entries.values() if scale > 0)
    if not scales:
        return {}
    median = scales[len(scales) // 2]
    # a weight without a spread (one entry, all zeros: nothing to be relative to) keeps the lr
    return {k: (p, (scale / median) ** 0.5 if scale > 0 else 1.0) for k, (p, scale) in entries.items()}


def by_weight_scale(model: torch.nn.Module, groups: list, lr: float) -> list:
    """Optimizer ``groups`` with each sparse delta's entries taken out of its group into
    one of its own, with that group's options and its lr (``lr`` where it has none)
    times the entries' factor."""
    factors = entry_lr_factors(model)
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in factors]} for g in groups]
    # the groups left first, then the entries: the order a saved optimizer state was made in
    return [g for g in rest if g["params"]] + [{**g, "params": [p], "lr": g.get("lr", lr) * factors[id(p)][1]}
                                               for g in groups for p in g["params"] if id(p) in factors]
