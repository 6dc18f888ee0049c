"""The density controller of thresholded deltas: one shift of every threshold, set for
the whole model so that the target fraction of path weights changes. Run before each
training forward pass, it lets the per-layer thresholds learn how the changes spread
over the layers while their total stays on target."""

from __future__ import annotations

from typing import Optional

import torch

from .. import delta_slot
from .delta import ThresholdDelta
from .methods import MODES


@torch.no_grad()
def calibrate_density(model: torch.nn.Module, density: Optional[float] = None) -> None:
    """Set every unmerged ThresholdDelta's tau_shift so that the fraction ``density``
    (default: the config's) of all their weights changes. A model without any (full
    fine-tuning, LoRA, fast mode) is left as it is."""
    deltas = [d for *_, d in delta_slot.iter_deltas(model) if isinstance(d, ThresholdDelta) and not d.merged]
    if not deltas:
        return
    density = density if density is not None else delta_slot.config_of(model).density
    scores = torch.cat([d.scores().float() for d in deltas])
    keep = int(round(density * scores.numel()))
    if keep >= scores.numel():
        shift = scores.min() - 1.0
    else:
        shift = torch.kthvalue(scores.cpu(), scores.numel() - keep).values  # `keep` scores lie above
    for d in deltas:
        d.tau_shift.fill_(float(shift))


@delta_slot.mark_hook
def _steer_density(model: torch.nn.Module, args) -> None:
    """Forward pre-hook: in training, recalibrate before the step uses the thresholds."""
    if model.training and torch.is_grad_enabled():
        calibrate_density(model)


def steer(model: torch.nn.Module) -> None:
    """Put the density on target now and before every training forward pass, where the
    model's mode has a controller (``delta_slot.strip`` removes the hook)."""
    if MODES[delta_slot.config_of(model).mode].steered:
        calibrate_density(model)
        model.register_forward_pre_hook(_steer_density)
