"""Moments out: an invariant per-atom head for moment magnitudes (signed or oriented
along a reference moment), and the self-consistent moments that minimise
E(R, m) over m at fixed positions."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .energy import MagneticEnergy
from .graph import MagneticBatch


class MomentHead(nn.Module):
    """|m_i| = softplus(MLP(node features of the energy module)): invariant, so it
    cannot tell ferro- from antiferromagnetic orders; ``oriented`` puts the sign or
    direction of a reference moment (the input's) on it."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, energy: MagneticEnergy, batch: MagneticBatch, node: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """The magnitudes (n,); ``node``: the energy module's node features of ``batch``
        where already built (``energy_and_forces(..., with_nodes=True)``)."""
        if node is None:
            *_, node = energy.geometry(batch, batch.positions.to(energy.embed.weight.dtype))
        return nn.functional.softplus(self.mlp(node)[:, 0])


def oriented(magnitudes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Moments (n, 3) of the predicted ``magnitudes`` along the ``reference`` moments'
    directions (collinear references along the axis give signed collinear moments);
    atoms with a zero reference get zero."""
    norm = reference.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, reference / norm.clamp(min=torch.finfo(norm.dtype).tiny), 0.0)
    return magnitudes[:, None] * unit


RUNAWAY = 10.0  # moments that grew beyond this many times the largest start ran away


def equilibrium_moments(energy: MagneticEnergy, batch: MagneticBatch, steps: int = 200,
                        tolerance: float = 1e-6) -> torch.Tensor:
    """The moments minimising E_mag(R, m) (the base energy does not depend on m) from
    ``batch.moments`` as the start, by LBFGS at fixed positions: where the learned energy
    holds the data's physics, the self-consistent moments (magnetic forces -dE/dm = 0).
    Atoms that start at m = 0 stay there (non-magnetic atoms, as the data treat them).
    Refused where b = 0 on every atom that moves: E_mag is then quadratic in m (every pair
    term is bilinear), E(cm) = c^2 E(m), so its only minimum is m = 0, or there is none."""
    dtype = energy.embed.weight.dtype
    positions, start = batch.positions.to(dtype), batch.moments.to(dtype)
    free = (start != 0).any(dim=1, keepdim=True)
    with torch.no_grad():
        _, b = energy.landau(energy.geometry(batch, positions)[-1])
    if free.any() and not b[free[:, 0]].any():
        raise ValueError("equilibrium_moments: E_mag is quadratic in the moments (its Landau b is 0 on every "
                         "magnetic atom: the fit found no quartic term in the data), so its only minimum is m = 0")
    m = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([m], lr=1.0, max_iter=steps, tolerance_grad=tolerance,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        e = energy(batch, positions, torch.where(free, m, start)).sum()
        e.backward()
        return e

    for p in energy.parameters():
        p.requires_grad_(False)
    try:
        optimizer.step(closure)
    finally:
        for p in energy.parameters():
            p.requires_grad_(True)
    m = torch.where(free, m, start).detach()
    if not (m.isfinite().all() and m.norm(dim=1).max() <= RUNAWAY * start.norm(dim=1).max()):
        raise ValueError(f"equilibrium_moments: E_mag has no minimum in |m| from these moments (|m| ran to "
                         f"{float(m.norm(dim=1).max()):.3g} μB, from {float(start.norm(dim=1).max()):.3g}): "
                         f"its fitted on-site terms are unbounded below (a < 0 with b = 0)")
    return m
