"""The density controller of thresholded deltas: one shift of every threshold, set for
the whole model so that the target fraction of path weights changes. Run before each
training forward pass, it lets the per-layer thresholds learn how the changes spread
over the layers while their total follows the schedule (zero before the first step, then
up to the target, or above it and back down)."""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from .. import delta_slot
from ..integrations import computing_model
from .delta import ThresholdDelta, counted, prepare_values, scores_of
from .methods import MODES


def scheduled_density(config, step: int) -> float:
    """The fraction of path weights that changes at training step ``step``: 0 before the
    first step (the model starts as the base, as LoRA's does), rising linearly to the peak
    over ``warmup_steps``, then down to the target over ``anneal_steps`` with the cubic
    schedule of gradual pruning (Zhu and Gupta, 2017: fast at first, gentle at the end)."""
    peak = config.peak_density if config.peak_density is not None else config.density
    if step < config.warmup_steps:
        return peak * step / config.warmup_steps
    left = 1.0 - (step - config.warmup_steps) / config.anneal_steps if config.anneal_steps else 0.0
    return config.density + (peak - config.density) * max(left, 0.0) ** 3


@torch.no_grad()
def calibrate_density(model: torch.nn.Module, density: Optional[float] = None) -> None:
    """Set every unmerged ThresholdDelta's tau_shift so that the fraction ``density``
    (default: the config's target) of their weights changes (of those counted: not the
    entries pinned at zero). A model without any
    (full fine-tuning, LoRA, fast mode) is left as it is."""
    deltas = _thresholded(model)
    if not deltas:
        return
    density = density if density is not None else delta_slot.config_of(model).density
    scores = scores_of(deltas)  # (pinned entries' scores lie below every other's)
    keep = int(round(density * counted(deltas)))
    if keep >= scores.numel():
        shift = scores.min() - 1.0
    elif keep == 0:  # clear of the largest score, where exp(log) round-off could let one through
        shift = scores.max() + 1.0
    else:  # on the scores' device: no copy to the host, no sync (run before every step)
        shift = split_point(scores, scores.numel() - keep)  # `keep` scores lie above
    torch._foreach_copy_([d.tau_shift for d in deltas], [shift] * len(deltas))
    deltas[0]._settled = _stamp(deltas)


def calibrate_to_schedule(model: torch.nn.Module) -> None:
    """:func:`calibrate_density` at the density the schedule gives after the training
    steps so far: 0 before the first (an untrained model stays the base, as after
    ``--epochs 0``), the target once past the warmup and the anneal."""
    deltas = _thresholded(model)
    if deltas:
        calibrate_density(model, scheduled_density(delta_slot.config_of(model), deltas[0].steps))


def settle(model: torch.nn.Module) -> None:
    """:func:`calibrate_to_schedule` where a delta's values or thresholds changed since the
    density was last set: the forward that sets it comes before its optimizer step, so a
    user's training loop left the model off target (a review's: 4.56 % for 3 %) for what
    came next. Run before a model's forward that is not a training step, and by
    ``save_adapter``, ``merge`` and ``stats``."""
    deltas = _thresholded(model)
    if not deltas or torch.compiler.is_compiling() or (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    if getattr(deltas[0], "_settled", None) != _stamp(deltas):
        calibrate_to_schedule(model)


def _stamp(deltas) -> tuple:
    """What the density was set from: the deltas' values and thresholds, by version."""
    return tuple(t._version for d in deltas for t in (d.v, d.log_tau))


def split_point(values: torch.Tensor, k: int, by_sort: Optional[bool] = None) -> torch.Tensor:
    """The midpoint of the ``k``-th and ``k + 1``-th smallest of the 1-d ``values`` (k from
    1 to n - 1), on their device: ``k`` values lie below it and the rest above, clear of
    both by half their gap (at the k-th itself, the exp and log round-off of the threshold
    decided that entry's side: half the time one entry too many changed). Off the CPU
    (a GPU, or ``meta`` in the sync proxies) a full sort: CUDA's kthvalue selects with one
    thread block per slice, 18.7 ms for MACE-MP-0 medium's 4.7 M scores on an H200 (a
    fifth of a sparse step, results/gpu_suite_20261204_182714.md), where a radix sort
    takes well under a millisecond. On the CPU numpy's introselect: 11 ms where torch's
    kthvalue takes 61 ms (2 cores, the same 4.7 M): a sparse step of H2O 132.0 -> 109.1 ms
    (benchmarks/sparse_step_host.py)."""
    if by_sort if by_sort is not None else values.device.type != "cpu":
        pair = torch.sort(values).values[k - 1:k + 1]
    else:
        pair = torch.as_tensor(np.partition(values.detach().numpy(), (k - 1, k))[k - 1:k + 1])
    return pair.mean()


def _steer_density(model: torch.nn.Module, module: torch.nn.Module, args) -> None:
    """Forward pre-hook of ``model``'s computing module: in training, recalibrate before
    the step uses the thresholds, then compute their values together. Training: the
    model in training mode, autograd on and the deltas trainable (a calculator's call,
    such as MACE's, which leaves the model in training mode but freezes its parameters, is
    not a step)."""
    deltas = _thresholded(model)
    if model.training and torch.is_grad_enabled() and deltas and deltas[0].v.requires_grad:
        calibrate_density(model, scheduled_density(delta_slot.config_of(model), deltas[0].steps))
        for d in deltas:
            d.steps += 1
        if not torch.compiler.is_compiling():  # (its stamps read data pointers; compiled, one at a time)
            prepare_values(deltas)
    else:
        settle(model)


def schedule_step(model: torch.nn.Module) -> int:
    """Training forwards so far, where the density schedule is (0 without a controller)."""
    deltas = _thresholded(model)
    return deltas[0].steps if deltas else 0


def set_schedule_step(model: torch.nn.Module, step: int) -> None:
    for d in _thresholded(model):
        d.steps = step


def steady(model: torch.nn.Module) -> bool:
    """Whether every training step from the next on has the same target density (past
    the warmup and the anneal, or no controller): what a training step replayed from a
    CUDA graph needs, since it calibrates to the density it was captured with."""
    deltas = _thresholded(model)
    if not deltas:
        return True
    config = delta_slot.config_of(model)
    return deltas[0].steps >= config.warmup_steps + config.anneal_steps


def _thresholded(model: torch.nn.Module):
    return [d for *_, d in delta_slot.iter_deltas(model) if isinstance(d, ThresholdDelta) and not d.merged]


def steer(model: torch.nn.Module) -> None:
    """Put the density on target now and before every training forward pass, where the
    model's mode has a controller (``delta_slot.strip`` removes the hook). The hook sits
    on the module whose forward a step runs: a wrapper's (magnetism's) never runs."""
    config = delta_slot.config_of(model)
    if MODES[config.mode].steered:
        calibrate_density(model, scheduled_density(config, 0))  # 0: the model starts as the base
        core = computing_model(model)[0] or model
        core.register_forward_pre_hook(delta_slot.mark_hook(functools.partial(_steer_density, model)))
