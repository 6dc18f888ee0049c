"""MACE's per-frame weights (``data._weights``: ``config_weight`` times the weight of the
frame's ``config_type``, times ``config_<label>_weight``) as the loss and the errors use
them: one weight per entry of a label's residuals. The loss counts w * penalty(r) and
divides by the same counts as unweighted (MACE's weighted means); the errors leave out
the entries of weight 0, as MACE's metrics do. Unweighted samples cost nothing here."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

from ..magnetism.loss import magnetic_labels


def weighted(samples: Sequence) -> bool:
    """Whether some label of ``samples`` weighs other than 1."""
    return any(s.weights for s in samples)


def _flat_labels(key: str, sample) -> torch.Tensor:
    """The flat labels of ``key`` in ``sample``, NaN where unlabelled (a frame without a
    stress label: 9 NaN)."""
    if key == "energy":
        return torch.tensor([sample.energy], dtype=torch.float64)
    if key == "forces":
        return sample.forces.reshape(-1)
    if key == "stress":
        return torch.full((9,), torch.nan) if sample.stress is None else sample.stress.reshape(-1)
    labels = magnetic_labels(key, sample)
    return torch.empty(0) if labels is None else labels


def entry_weights(batch: Sequence, key: str, labelled: bool = True) -> torch.Tensor:
    """The weight of each entry of label ``key`` in ``batch`` (float64, on the host): of its
    residuals (``labelled``: the entries with a label, as the residuals are taken), or of
    every entry of its labels, NaN placeholders included."""
    parts = []
    for s in batch:
        labels = _flat_labels(key, s)
        w = torch.full((len(labels),), s.weights.get(key, 1.0), dtype=torch.float64)
        parts.append(w[labels.isfinite()] if labelled else w)
    return torch.cat(parts)


def weighing(batch: Sequence) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """(key, penalties of its residuals in ``batch``) -> the penalties weighed; the
    penalties themselves where no label of ``batch`` is weighted."""
    if not weighted(batch):
        return lambda key, values: values
    return lambda key, values: values * entry_weights(batch, key).to(values).reshape(values.shape)


def residual_weights(batch: Sequence, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``entry_weights`` of ``keys`` as ``evaluation.residuals`` keeps them: ``{key}_weights``."""
    return {f"{key}_weights": entry_weights(batch, key) for key in keys}


def scored(res: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The residuals ``res`` that the errors count: those of weight > 0 (a label none of
    whose entries weighs more: left out, as MACE's metrics leave it)."""
    kept = {k: v[res[f"{k}_weights"] > 0] if f"{k}_weights" in res else v for k, v in res.items()}
    return {k: v for k, v in kept.items() if v.numel()}
