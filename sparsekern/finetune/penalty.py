"""What the fine-tuning loss counts of a residual r, by MACE's ``--loss``: r^2 (its
weighted mean squares), or Huber's with ``--huber_delta`` (``huber``; ``universal``: the
forces' delta smaller where the reference force is large, MACE's conditional Huber). The
loss's weights and means are the same either way; every term (energies, forces, stresses,
magnetic forces and moments) takes the run's penalty."""

from __future__ import annotations

from typing import Optional, Union

import torch

PENALTIES = ("weighted", "huber", "universal")  # the trainer's --loss: mean squares, then MACE's Huber losses
HUBER_DELTA = 0.01  # MACE's --huber_delta
# MACE's conditional Huber (``universal``): the forces' delta times these factors where
# the reference force's norm (eV/Å) is below 100, 200, 300 and beyond
_FORCE_BOUNDS = (100.0, 200.0, 300.0)
_FORCE_FACTORS = (1.0, 0.7, 0.4, 0.1)

Delta = Union[None, float, torch.Tensor]


def penalty(residual: torch.Tensor, delta: Delta = None) -> torch.Tensor:
    """residual^2 elementwise, or with ``delta`` (a number, or one per entry) Huber's:
    r^2 / 2 where |r| < delta, delta (|r| - delta / 2) beyond (torch's ``huber_loss``)."""
    if delta is None:
        return residual.square()
    size = residual.abs()
    return torch.where(size < delta, 0.5 * residual.square(), delta * (size - 0.5 * delta))


def delta(settings) -> Optional[float]:
    """The Huber delta of the run's ``settings`` (None: mean squares)."""
    return None if settings.loss == "weighted" else settings.huber_delta


def force_delta(settings, forces: torch.Tensor) -> Delta:
    """The Huber delta of each component of the reference ``forces`` (n, 3) (None: mean
    squares): ``universal``'s shrinks with the atom's force."""
    if settings.loss != "universal":
        return delta(settings)
    bounds = torch.tensor(_FORCE_BOUNDS, dtype=forces.dtype, device=forces.device)
    factors = torch.tensor(_FORCE_FACTORS, dtype=forces.dtype, device=forces.device)
    step = torch.bucketize(forces.norm(dim=-1), bounds, right=True)  # the norm's interval
    return (settings.huber_delta * factors[step]).unsqueeze(-1).expand_as(forces)
