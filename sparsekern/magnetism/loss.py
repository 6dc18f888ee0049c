"""The magnetic terms of the fine-tuning loss and errors: magnetic forces -dE/dm
against their labels (eV/μB; the components a collinear label gives, NaN the others),
predicted moment magnitudes against the labels' (μB; of the atoms with a moment)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch


KEYS = ("magforces", "magmom")  # the magnetic outputs with labels


def magnetic_labels(key: str, sample) -> Optional[torch.Tensor]:
    """The flat labels of magnetic output ``key`` in ``sample`` (NaN: not labelled), or
    None without labels: the magnetic forces' components, or the moments' magnitudes,
    NaN where the moment is 0: the model's moments there are 0 whatever the head says
    (``moments.oriented``), so there is no prediction to score or train."""
    if key == "magforces":
        return None if sample.magforces is None else sample.magforces.reshape(-1)
    if sample.magmom is None:
        return None
    norm = sample.magmom.double().norm(dim=1)
    return norm.where(norm > 0, torch.nan)


def labelled_count(labels: torch.Tensor) -> int:
    """How many of ``labels`` are labelled (not NaN)."""
    return int(labels.isfinite().sum())


def magnetic_residuals(out: Dict[str, torch.Tensor], batch: Sequence) -> Dict[str, torch.Tensor]:
    """Flat residuals of the labelled entries of each magnetic output that has labels in
    every sample of ``batch``."""
    res = {}
    for key in KEYS:
        labels = [magnetic_labels(key, s) for s in batch]
        if key not in out or any(label is None for label in labels):
            continue
        label = torch.cat(labels)
        r = out[key].reshape(-1) - label.to(out[key])
        labelled = label.isfinite()  # (on the host: indexing by it does not sync)
        res[key] = r if labelled.all() else r[labelled.nonzero()[:, 0].to(r.device)]
    return res


def magnetic_weights(batch: Sequence, settings, whole: Sequence) -> Dict[str, float]:
    """The weight of each magnetic term whose labels every sample of ``batch`` has, over
    its count of labelled entries in ``whole`` (the global batch that ``batch`` is one
    process's share of): what a squared residual of it counts in the loss."""
    weights = {}
    for key, weight in (("magforces", settings.magforces_weight), ("magmom", settings.magmom_weight)):
        if batch and all(getattr(s, key) is not None for s in batch):  # (KEYS are the samples' label fields)
            weights[key] = weight / max(1, sum(labelled_count(magnetic_labels(key, s)) for s in whole
                                               if getattr(s, key) is not None))
    return weights


def magnetic_loss(out: Dict[str, torch.Tensor], batch: Sequence, settings, whole: Sequence,
                  penalty: Callable[[str, torch.Tensor], torch.Tensor] = lambda key, r: r.square()) -> torch.Tensor:
    """magforces_weight * mean(penalty("magforces", dH)) + magmom_weight *
    mean(penalty("magmom", d|m|)) (0 without labels; the penalty of each residual: its
    square, or the run's Huber's, at its weight), the means over ``whole``, the global
    batch that ``batch`` is one process's share of."""
    weights = magnetic_weights(batch, settings, whole)
    terms = [weights[k] * penalty(k, r).sum() for k, r in magnetic_residuals(out, batch).items()]
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
