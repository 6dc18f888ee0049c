"""The stress term of the fine-tuning loss and its errors (``--stress_weight``), MACE's
stress loss where every frame has a label. Frames without one add nothing to either,
and the mean is over the labelled frames' values: MACE's is over all the batch's frames
(the unlabelled at weight 0), so where a fraction p of the frames is labelled, the same
weight counts 1/p times as much here, the same from batch to batch."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch


def wanted(batch: Sequence) -> bool:
    """Whether the model computes stresses for ``batch``: some frame of it has a label."""
    return any(s.stress is not None for s in batch)


def stress_residuals(out: Dict[str, torch.Tensor], batch: Sequence) -> Dict[str, torch.Tensor]:
    """Flat stress residuals (eV/Å^3) of the frames of ``batch`` that have a label."""
    labelled = [i for i, s in enumerate(batch) if s.stress is not None]
    if not labelled:
        return {}
    label = torch.stack([batch[i].stress for i in labelled]).to(out["stress"])
    return {"stress": (out["stress"][labelled] - label).reshape(-1)}


def value_weight(settings, whole: Sequence) -> float:
    """What a squared stress residual counts in the loss: stress_weight over the values of
    the labelled frames of ``whole`` (the global batch a process's share is part of)."""
    return settings.stress_weight / (9 * sum(s.stress is not None for s in whole))


def stress_loss(out: Dict[str, torch.Tensor], batch: Sequence, settings, whole: Sequence,
                penalty: Callable[[str, torch.Tensor], torch.Tensor] = lambda key, r: r.square()) -> torch.Tensor:
    """stress_weight * mean(penalty("stress", S - S_ref)) over the labelled frames of
    ``whole``, the global batch that ``batch`` is one process's share of (0 without labels)."""
    res = stress_residuals(out, batch)
    if not res:
        return torch.zeros((), dtype=out["energy"].dtype, device=out["energy"].device)
    return value_weight(settings, whole) * penalty("stress", res["stress"]).sum()


def stress_errors(res: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """MAE / RMSE of the stress residuals, in meV/Å^3 (MACE's unit)."""
    if "stress" not in res:
        return {}
    return {"stress_mae_mev_per_A3": 1e3 * float(res["stress"].abs().mean()),
            "stress_rmse_mev_per_A3": 1e3 * float(res["stress"].square().mean().sqrt())}
