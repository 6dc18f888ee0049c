"""The magnetic terms of the fine-tuning loss and errors: magnetic forces -dE/dm
against their labels (eV/μB; the components a collinear label gives, NaN the others),
predicted moment magnitudes against the labels' (μB)."""

from __future__ import annotations

from typing import Dict, Sequence

import torch


def magnetic_residuals(out: Dict[str, torch.Tensor], batch: Sequence) -> Dict[str, torch.Tensor]:
    """Flat residuals of each magnetic output that has labels in every sample of ``batch``."""
    res = {}
    if "magforces" in out and all(s.magforces is not None for s in batch):
        label = torch.cat([s.magforces for s in batch]).reshape(-1)
        res["magforces"] = out["magforces"].reshape(-1) - label.to(out["magforces"])
        labelled = label.isfinite()  # (on the host: indexing by it does not sync)
        if not labelled.all():
            res["magforces"] = res["magforces"][labelled.nonzero()[:, 0].to(res["magforces"].device)]
    if "magmom" in out and all(s.magmom is not None for s in batch):
        label = torch.cat([s.magmom for s in batch]).to(out["magmom"]).norm(dim=1)
        res["magmom"] = out["magmom"] - label
    return res


def magnetic_weights(batch: Sequence, settings, whole: Sequence) -> Dict[str, float]:
    """The weight of each magnetic term whose labels every sample of ``batch`` has, over
    its count in ``whole`` (the global batch that ``batch`` is one process's share of):
    what a squared residual of it counts in the loss."""
    weights = {}
    if batch and all(s.magforces is not None for s in batch):
        weights["magforces"] = settings.magforces_weight / sum(labelled_count(s.magforces) for s in whole
                                                               if s.magforces is not None)
    if batch and all(s.magmom is not None for s in batch):
        weights["magmom"] = settings.magmom_weight / sum(s.natoms for s in whole if s.magmom is not None)
    return weights


def labelled_count(magforces: torch.Tensor) -> int:
    """How many components of magnetic-force labels are labelled (collinear: 1 per atom)."""
    return int(magforces.isfinite().sum())


def magnetic_loss(out: Dict[str, torch.Tensor], batch: Sequence, settings, whole: Sequence) -> torch.Tensor:
    """magforces_weight * mean(dH^2) + magmom_weight * mean(d|m|^2) (0 without labels), the
    means over ``whole``, the global batch that ``batch`` is one process's share of."""
    weights = magnetic_weights(batch, settings, whole)
    terms = [weights[k] * r.square().sum() for k, r in magnetic_residuals(out, batch).items()]
    return sum(terms, torch.zeros((), dtype=out["energy"].dtype, device=out["energy"].device))


def magnetic_errors(res: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """MAE / RMSE of the magnetic residuals (all frames), in meV/μB and μB."""
    errors = {}
    if "magforces" in res:
        errors["magforce_mae_mev_per_muB"] = 1e3 * float(res["magforces"].abs().mean())
        errors["magforce_rmse_mev_per_muB"] = 1e3 * float(res["magforces"].square().mean().sqrt())
    if "magmom" in res:
        errors["magmom_mae_muB"] = float(res["magmom"].abs().mean())
    return errors
