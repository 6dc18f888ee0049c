"""The magnetic energy fitted in closed form. E_mag is linear in the parameters of its
output layers (the pair couplings' last layer, the Landau a term's row and b's constant
part, which is bound to b >= 0: where the unbounded solution has b < 0, b = 0 and the rest
is solved again), and so are its forces and magnetic forces: with the hidden layers at their random start,
fitting those parameters to the energy and force residuals and the magnetic forces is a
linear least-squares problem (random features). The trainer solves it instead of
training the module with the optimizer: the Heisenberg energies of a spin configuration
are large and nearly cancel between the couplings and the on-site terms, which Adam,
moving each parameter by ~lr per step, finds slowly (benchmarks/NOTES.md, NiO), and once
the fit holds them, small steps on the hidden layers undo it.

A prior keeps the volume and shape dependence the base model has: E_mag's change under a few
small strains of each periodic frame (``STRAINS``, its own neighbours), per atom, is fitted to 0,
with the frame's moments and with them all turned parallel (``ferromagnetic``), at the
largest term's weight (``PRIOR``). Without it nothing constrains that dependence where the
training frames share one cell: with |m| near constant, the on-site terms of the
environment act as a free potential, and a review's fit on FCC Fe at one lattice constant
changed the energy by far more at 2 % strain than the data's spread (benchmarks/magnetic_eos.py).
With the data's moments alone, exchange couplings whose changes cancel over the data's
disordered moments were left free, and a ferromagnetic order's E_mag moved by eV per atom
under 2 % strain; at the energies' weight (1 by default, against the forces' 100) the
prior hardly held.

The normal equations are sums over frames (and over processes), kept per fold of frames
and per term; per-element energy offsets are fitted beside the couplings and dropped
(the E0 refit owns them); the ridge, and whether E_mag's forces follow the base's force
residuals, are chosen by cross-validation over the frames (or E_mag stays 0)."""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .energy import N_ELEMENTS, MagneticEnergy
from .graph import AXIS, SKIN, MagneticBatch

TERMS = ("energy", "forces", "magforces", "stress", "strain")  # outputs of MagneticEnergy it fits; the prior
_E = torch.eye(3, dtype=torch.float64)
_S = 1.0 - SKIN  # 2 %: no strain compresses a distance by more (the graphs' neighbours reach that far)
# the prior's strains: 1 and 2 % compression and expansion (the 1 % ones: E_mag swung between
# the 2 % points), uniaxial along x, y, z, and shears
STRAINS = [_S * _E, -_S * _E, _S / 2 * _E, -_S / 2 * _E] + [_S * torch.outer(_E[i], _E[i]) for i in range(3)] + [
    _S / 2 * (torch.outer(_E[i], _E[j]) + torch.outer(_E[j], _E[i])) for i, j in ((0, 1), (1, 2), (2, 0))]
# the prior's weight over the largest of the other terms': on FCC Fe (benchmarks/magnetic_eos.py) 1 held
# E_mag's change over ±2 % within 6, 12 and 30 meV/atom (the data's order, ferromagnetic, layered
# antiferromagnetic; 176, 2210, 329 without) at test errors no worse than without; 100 held the first
# two tighter but not the third, at 50 % larger energy errors
PRIOR = 1.0


def ferromagnetic(batch: MagneticBatch) -> MagneticBatch:
    """``batch`` with each moment turned along ``graph.AXIS``, its length kept."""
    axis = batch.moments.new_tensor(AXIS)
    return dataclasses.replace(batch, moments=batch.moments.norm(dim=1, keepdim=True) * axis)


def prior_rows(frames: int) -> int:
    """The prior's rows of ``frames`` frames: a strain and a moment order each."""
    return 2 * len(STRAINS) * frames


def prior_weight(weights: Dict[str, float]) -> float:
    return PRIOR * max(weights.values())


def _linear_parameters(energy: MagneticEnergy) -> List[Tuple[torch.nn.Parameter, object]]:
    """(parameter, index) of each block E_mag is linear in; the last, b's constant part,
    only where it is >= 0 (E_mag clamps b there)."""
    pair, onsite = energy.pair[-1], energy.onsite[-1]
    return [(pair.weight, slice(None)), (pair.bias, slice(None)), (onsite.weight, 0), (onsite.bias, 0),
            (onsite.bias, 1)]


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


def _columns(energy: MagneticEnergy, batch: MagneticBatch, stress: bool, prior: bool) -> Dict[str, torch.Tensor]:
    """E_mag per frame (F, K), its forces and magnetic forces (3n, K) and, with ``stress``,
    its stresses (9F, K), with ``prior`` its change under each of ``STRAINS`` per frame
    (2 S F, K): for each unit parameter vector (E_mag is linear in them: K passes of the
    module give its exact design matrix), the prior's from one pass per strain and order."""
    k = n_linear(energy)
    terms = [t for t in TERMS if t not in ("strain", "stress") or (t == "stress" and stress)]
    cols: Dict[str, list] = {key: [] for key in terms}
    for unit in torch.eye(k, dtype=torch.float64):
        _assign(energy, unit)
        out = energy.outputs(batch, stress=stress)
        for key in terms:
            cols[key].append(out[key].detach().double().reshape(-1).cpu())
    _assign(energy, torch.zeros(k, dtype=torch.float64))
    out = {key: torch.stack(c, 1) for key, c in cols.items()}
    if prior:  # rows by moment order, then strain, then frame
        orders = [(batch, out["energy"])]
        aligned = ferromagnetic(batch)
        orders.append((aligned, _energy_columns(energy, aligned, torch.zeros(3, 3, dtype=torch.float64))))
        out["strain"] = torch.cat([_energy_columns(energy, b, s) - zero for b, zero in orders for s in STRAINS])
    return out


def _energy_columns(energy: MagneticEnergy, batch: MagneticBatch, strain: torch.Tensor) -> torch.Tensor:
    """(F, K): the strained energy per frame's derivatives in E_mag's linear parameters,
    at the zero start (E_mag is linear in them, so these are its columns; b's clamp at 0
    passes its gradient): one pass and one batched backward, where the unit vectors take K
    passes, each building the geometry and node features again."""
    linear = _linear_parameters(energy)
    params = [p for p, _ in linear]
    frozen = [p for p in set(params) if not p.requires_grad]  # (the trainer fits a frozen module)
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            e = energy.strained(batch, strain)
            grads = torch.autograd.grad(e, params, torch.eye(len(e), dtype=e.dtype, device=e.device),
                                        is_grads_batched=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return torch.cat([g[:, i].reshape(len(e), -1) for g, (_, i) in zip(grads, linear)],
                     1).double().cpu()


FOLDS = 5  # frame i of the fit's parts is in fold i % FOLDS
RIDGES = torch.logspace(-12, 0, 25, dtype=torch.float64)  # relative to the scaled gram's largest eigenvalue


def normal_equations(energy: MagneticEnergy, parts: Iterable[tuple], counts: Dict[str, int]) -> torch.Tensor:
    """(FOLDS, len(TERMS), K + 1, K + 1): for each fold of frames and each term, Z^T Z with
    Z = [X y], X the design matrix of the least-squares problem over ``parts`` (its K
    columns: E_mag's linear parameters, then the per-element offsets, energy rows only)
    and y the targets: tuples (batch, {term: target}, first, {term: weights}) with what
    E_mag should add to each term of ``TERMS`` that has labels: the energy residual per
    frame (eV), the force residuals, the magnetic-force labels (n, 3) and the stress
    residuals (F, 3, 3); NaN (a frame without a stress label, a component a collinear
    label leaves out): its rows are left out. Energy rows are per atom; each row is
    scaled by the square root of its weight (the flat target's entry's; a term without
    weights: 1) and by 1/sqrt(``counts``: its term's global number of labelled entries),
    so that the solve's term weights make the training loss, and sums over processes add
    up (with ``counts["strain"]``, ``prior_rows`` of the frames, the strain prior's rows
    too, made here for the periodic frames). The force rows matter: E_mag depends on
    positions, and fitted to energies alone its
    random features give forces of eV/Å. ``first`` is the global index of the batch's
    first frame (over every process's parts), and frame i goes to fold i % FOLDS: the
    solve's cross-validation holds out whole frames, the same folds in any number of
    processes."""
    if any(p.abs().max() > 0 for layer in (energy.pair[-1], energy.onsite[-1]) for p in layer.parameters()):
        raise ValueError("the magnetic module's output layers must be at their zero start")
    k = n_linear(energy) + N_ELEMENTS
    system = torch.zeros(FOLDS, len(TERMS), k + 1, k + 1, dtype=torch.float64)
    for batch, targets, first, weights in parts:  # (made outside no_grad: the base computes forces)
        with torch.no_grad():
            cols = _columns(energy, batch, "stress" in targets, "strain" in counts)
            frame = batch.frame.cpu()
            elements = torch.zeros(batch.n_frames, N_ELEMENTS, dtype=torch.float64)
            elements.index_put_((frame, batch.numbers.cpu()), torch.ones(len(frame), dtype=torch.float64),
                                accumulate=True)
            natoms = elements.sum(1, keepdim=True)
            periodic = batch.volume.cpu() > 0  # the prior's frames: E_mag's change under STRAINS to 0
            prior = {"strain": torch.where(periodic, 0.0, torch.nan).double().repeat(prior_rows(1))}
            for key, target in {**targets, **(prior if "strain" in counts else {})}.items():
                x, y = cols[key], target.double().cpu().reshape(-1)
                if key in ("energy", "strain"):  # per atom; the prior's by order and strain, then frame
                    per = natoms.repeat(len(x) // batch.n_frames, 1)
                    x = torch.cat([x, elements.repeat(len(x) // batch.n_frames, 1) * (key == "energy")], 1) / per
                    y, fold = y / per[:, 0], torch.arange(batch.n_frames).repeat(len(x) // batch.n_frames)
                else:  # rows of atom (or, stresses, frame) i: 3i, 3i+1, 3i+2 (9i, ..., 9i+8)
                    x = torch.cat([x, torch.zeros(len(x), N_ELEMENTS, dtype=torch.float64)], 1)
                    owner = torch.arange(batch.n_frames) if key == "stress" else frame
                    fold = owner.repeat_interleave(len(x) // len(owner))
                labelled = y.isfinite()
                x, y, fold = x[labelled], y[labelled], fold[labelled]
                z = torch.cat([x, y[:, None]], 1) / max(counts[key], 1) ** 0.5
                if key in weights:
                    z = z * weights[key].double().cpu()[labelled].sqrt()[:, None]
                fold = (fold + first) % FOLDS
                for f in range(FOLDS):
                    rows = z[fold == f]
                    system[f, TERMS.index(key)] += rows.T @ rows
    return system


class _Problem:
    """The weighted problem of a set of folds, with the offsets projected out (fitted
    without penalty) and the rest scaled to unit diagonal and diagonalised once, so that
    every ridge and force target costs a matrix-vector product. The last of E_mag's
    parameters, b's constant part, is bound to >= 0: a convex problem with one bound,
    whose solution, where the unbounded one breaks it, has the bound active (the problem
    with that parameter at 0, ``_Problem`` of the rest, made on first use)."""

    def __init__(self, system: torch.Tensor, weights: torch.Tensor, k: int, bounded: bool = True):
        self.system, self.weights, self.bounded, self._at_bound = system, weights, bounded, None
        if not bounded:  # b's constant part fixed at 0: its row and column out
            keep = [c for c in range(system.shape[-1]) if c != k - 1]
            system, k = system[..., keep, :][..., keep], k - 1
        a = _weighted(system, weights)
        forces = system[TERMS.index("forces")] * weights[TERMS.index("forces")]
        self.k, self.g = k, a[:-1, :-1]
        self.offsets = torch.linalg.pinv(self.g[k:, k:], hermitian=True)
        cross = self.g[:k, k:]
        gram = self.g[:k, :k] - cross @ self.offsets @ cross.T
        scale = gram.diagonal().clamp(min=0).sqrt()
        self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # columns the data never touch
        self.eig, self.vec = torch.linalg.eigh(gram / torch.outer(self.scale, self.scale))
        self.eig = self.eig.clamp(min=0)
        self.b = {"residual": a[:-1, -1], "zero": a[:-1, -1] - forces[:-1, -1]}  # forces' target: residual or 0

    def fit(self, ridge: float, target: str, lam: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The solution (E_mag's parameters, then the offsets) at a relative ridge, b's
        constant part >= 0 (``lam``: the absolute penalty, the whole problem's where b is
        at its bound: the same objective, its parameter fixed)."""
        k, b = self.k, self.b[target]
        cross = self.g[:k, k:]
        rhs = (b[:k] - cross @ self.offsets @ b[k:]) / self.scale
        lam = ridge * self.eig.max().clamp(min=1e-300) if lam is None else lam
        theta = (self.vec @ ((self.vec.T @ rhs) / (self.eig + lam))) / self.scale
        if not self.bounded:
            return torch.cat([theta, theta.new_zeros(1), self.offsets @ (b[k:] - cross.T @ theta)])
        if theta[-1] >= 0:
            return torch.cat([theta, self.offsets @ (b[k:] - cross.T @ theta)])
        if self._at_bound is None:
            self._at_bound = _Problem(self.system, self.weights, k, bounded=False)
        return self._at_bound.fit(ridge, target, lam)

    def offsets_only(self) -> torch.Tensor:
        b = self.b["residual"]
        return torch.cat([b.new_zeros(self.k), self.offsets @ b[self.k:]])


def _weighted(system: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(K + 1, K + 1): the terms of a (terms, K + 1, K + 1) system summed at the loss's weights."""
    return (system * weights[:, None, None]).sum(0)


def _loss(a: torch.Tensor, phi: torch.Tensor) -> float:
    """The loss of parameters ``phi`` on the rows of ``a`` (``_weighted``)."""
    return float(phi @ a[:-1, :-1] @ phi - 2 * phi @ a[:-1, -1] + a[-1, -1])


def solve(energy: MagneticEnergy, system: torch.Tensor, weights: Dict[str, float]) -> dict:
    """Set the output layers to the least-squares solution of ``system``
    (``normal_equations``) at the term weights of the training loss, choosing by
    cross-validation over the folds (each fold's frames held out in turn, scored by the
    loss on them) the ridge and what E_mag's forces are fitted to: the base's force
    residuals, or zero (on a base whose force errors are not magnetic, E_mag's on-site
    terms would otherwise act as a second potential); or E_mag = 0, where nothing beats
    it on held-out frames. Frames, not rows, are held out: the rows of one frame are
    correlated, which a per-row criterion (generalised cross-validation, used before)
    ignores. The offsets are fitted without penalty and dropped (the E0 refit owns
    them). Returns the choice and its held-out loss."""
    k = n_linear(energy)
    w = torch.tensor([weights.get(t, 0.0) for t in TERMS], dtype=torch.float64)
    used = [f for f in range(system.shape[0]) if system[f, :, -1, -1].any() or system[f, :, :-1, :-1].any()]
    scores: Dict[tuple, float] = {}
    if len(used) >= 2:
        candidates = [(float(r), t) for r in RIDGES for t in ("residual", "zero")]
        for held in used:
            problem = _Problem(system[[f for f in used if f != held]].sum(0), w, k)
            a = _weighted(system[held], w)
            for c in candidates + [None]:
                phi = problem.offsets_only() if c is None else problem.fit(*c)
                scores[c] = scores.get(c, 0.0) + _loss(a, phi)
    choice = min(scores, key=scores.get) if scores else None  # one frame: nothing to validate on, E_mag = 0
    theta = torch.zeros(k, dtype=torch.float64)
    if choice is not None:
        theta = _Problem(system.sum(0), w, k).fit(*choice)[:k]
    _assign(energy, theta)
    ridge, target = choice if choice is not None else (None, None)
    return {"ridge": ridge, "force_target": target, "held_out_loss": scores.get(choice),
            "held_out_loss_without": scores.get(None)}
