"""The magnetic energy fitted in closed form. E_mag is linear in the parameters of its
output layers (the pair couplings' last layer and the Landau a term's row; b stays 0),
and so are its forces and magnetic forces: with the hidden layers at their random start,
fitting those parameters to the energy and force residuals and the magnetic forces is a
linear least-squares problem (random features). The trainer solves it instead of
training the module with the optimizer: the Heisenberg energies of a spin configuration
are large and nearly cancel between the couplings and the on-site terms, which Adam,
moving each parameter by ~lr per step, finds slowly (benchmarks/NOTES.md, NiO), and once
the fit holds them, small steps on the hidden layers undo it.

The normal equations are sums over frames (and over processes); per-element energy
offsets are fitted beside the couplings and dropped (the E0 refit owns them); a ridge
chosen by generalised cross-validation keeps the random features from overfitting."""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch

from .energy import N_ELEMENTS, MagneticEnergy
from .graph import MagneticBatch

TERMS = ("energy", "forces", "magforces")  # what energy_and_forces gives, in its order


def _linear_parameters(energy: MagneticEnergy) -> List[Tuple[torch.nn.Parameter, object]]:
    """(parameter, index) of each block E_mag is linear in."""
    pair, onsite = energy.pair[-1], energy.onsite[-1]
    return [(pair.weight, slice(None)), (pair.bias, slice(None)), (onsite.weight, 0), (onsite.bias, 0)]


def zero_outputs(energy: MagneticEnergy) -> None:
    """The output layers at their zero start (E_mag = 0, b = 0), where the fit begins."""
    with torch.no_grad():
        for layer in (energy.pair[-1], energy.onsite[-1]):
            for p in layer.parameters():
                p.zero_()


def n_linear(energy: MagneticEnergy) -> int:
    return sum(p[i].numel() for p, i in _linear_parameters(energy))


def _assign(energy: MagneticEnergy, theta: torch.Tensor) -> None:
    offset = 0
    for p, i in _linear_parameters(energy):
        n = p[i].numel()
        p.data[i] = theta[offset:offset + n].view_as(p[i]).to(p)
        offset += n


def _columns(energy: MagneticEnergy, batch: MagneticBatch) -> Dict[str, torch.Tensor]:
    """E_mag per frame (F, K), its forces and magnetic forces (3n, K) for each unit parameter
    vector (E_mag is linear in them: K passes of the module give its exact design matrix)."""
    k = n_linear(energy)
    cols: Dict[str, list] = {key: [] for key in TERMS}
    for unit in torch.eye(k, dtype=torch.float64):
        _assign(energy, unit)
        for key, t in zip(TERMS, energy.energy_and_forces(batch)):
            cols[key].append(t.detach().double().reshape(-1).cpu())
    _assign(energy, torch.zeros(k, dtype=torch.float64))
    return {key: torch.stack(c, 1) for key, c in cols.items()}


def normal_equations(energy: MagneticEnergy, parts: Iterable[tuple], weights: Dict[str, float],
                     counts: Dict[str, int]) -> torch.Tensor:
    """Z^T Z, Z = [X y 1], of the weighted least-squares problem over ``parts``: tuples
    (batch, {term: target}) with what E_mag should add to each term of ``TERMS`` that has
    labels: the energy residual per frame (eV), the force residuals and the magnetic-force
    labels (n, 3). Rows are weighted as the training loss weighs them (``weights``):
    energies per atom over the number of frames, forces and magnetic forces over their
    entries (``counts``: the global counts, so that the sums of processes add up). X's last
    N_ELEMENTS columns are the per-element offsets (energy rows only); y^T y and the number
    of rows come along for the choice of the ridge. The force rows matter: E_mag depends on
    positions, and fitted to energies alone its random features give forces of eV/Å."""
    if any(p.abs().max() > 0 for layer in (energy.pair[-1], energy.onsite[-1]) for p in layer.parameters()):
        raise ValueError("the magnetic module's output layers must be at their zero start")
    k = n_linear(energy) + N_ELEMENTS
    system = torch.zeros(k + 2, k + 2, dtype=torch.float64)
    for batch, targets in parts:  # (made outside no_grad: the base computes forces)
        with torch.no_grad():
            cols = _columns(energy, batch)
            elements = torch.zeros(batch.n_frames, N_ELEMENTS, dtype=torch.float64)
            elements.index_put_((batch.frame.cpu(), batch.numbers.cpu()), torch.ones(len(batch.frame),
                                dtype=torch.float64), accumulate=True)
            natoms = elements.sum(1, keepdim=True)
            for key, target in targets.items():
                w = (weights[key] / max(counts[key], 1)) ** 0.5
                x, y = cols[key], target.double().cpu().reshape(-1)
                if key == "energy":
                    x, y = torch.cat([x, elements], 1) / natoms, y / natoms[:, 0]
                else:
                    x = torch.cat([x, torch.zeros(len(x), N_ELEMENTS, dtype=torch.float64)], 1)
                z = torch.cat([x * w, y[:, None] * w, torch.ones_like(y)[:, None]], 1)
                system += z.T @ z
    return system


def solve(energy: MagneticEnergy, system: torch.Tensor) -> None:
    """Set the output layers to the ridge solution of ``system`` (``normal_equations``),
    the ridge chosen by generalised cross-validation: with a few frames and 60-odd random
    features, the unregularised fit interpolates and extrapolates wildly. The offsets
    are fitted without penalty (projected out first) and dropped."""
    k = n_linear(energy)
    g, b, yy, rows = system[:-2, :-2], system[:-2, -2], system[-2, -2], system[-1, -1]
    offsets = torch.linalg.pinv(g[k:, k:], hermitian=True)
    cross = g[:k, k:]
    gram, rhs = g[:k, :k] - cross @ offsets @ cross.T, b[:k] - cross @ offsets @ b[k:]
    yy, rows = yy - b[k:] @ offsets @ b[k:], rows - torch.linalg.matrix_rank(g[k:, k:], hermitian=True)
    scale = gram.diagonal().clamp(min=0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # columns nothing in the data touches
    eig, vec = torch.linalg.eigh(gram / torch.outer(scale, scale))
    eig = eig.clamp(min=0)
    c2 = (vec.T @ (rhs / scale)).square()
    ridges = eig.max().clamp(min=1e-300) * torch.logspace(-12, 0, 61, dtype=eig.dtype)[:, None]
    rss = (yy - (c2 * (eig + 2 * ridges) / (eig + ridges).square()).sum(1)).clamp(min=0)
    left = rows - (eig / (eig + ridges)).sum(1)  # residual degrees of freedom
    gcv = torch.where(left > 0.5, rss / left.clamp(min=0.5).square(), torch.full_like(rss, float("inf")))
    ridge = ridges[int(gcv.argmin())]
    _assign(energy, (vec @ ((vec.T @ (rhs / scale)) / (eig + ridge))) / scale)
