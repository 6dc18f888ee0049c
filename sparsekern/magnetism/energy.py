"""The magnetic energy E_mag(R, Z, m) added to a foundation model's energy:

    E_mag = 1/2 sum_(i != j) J_ij m_i . m_j + sum_i a_i |m_i|^2 + b_i |m_i|^4

J_ij = J(r_ij, z_i, z_j, env_i, env_j) (Heisenberg exchange, Gaussians in r
times a cutoff), a_i, b_i = f(z_i, env_i) (Landau on-site terms; b >= 0 keeps E bounded
below in |m| where b > 0; the closed-form fit fits b's constant part, >= 0: where it is 0,
E_mag is quadratic in m, its minimum in m is m = 0 or there is none),
env_i an invariant summary of atom i's neighbours. Every term is even in
m (time reversal), depends on distances and m_i . m_j only (invariant under a common
rotation of positions and moments, and under a rotation of the moments alone: no
spin-orbit coupling), and vanishes where m_i = 0. ``spin_orbit=True`` adds the two
lowest-order anisotropic pair terms, D_ij . (m_i x m_j) (Dzyaloshinskii-Moriya) and
K_ij (m_i . r^_ij)(m_j . r^_ij) (pseudo-dipolar), which couple moments to the lattice.
Moments are axial vectors, so D_ij must be one too: D_ij = c_ij r^_ij x (v_i + v_j),
v_i = sum_k g_ik r^_ik a polar vector of atom i's neighbours (g_ik from r_ik and z_k),
the three-site form of Fert and Levy (r_ij x r_ik) with weights that add over the
neighbours of i and of j. It is even under inversion, vanishes where the bond's
midpoint is an inversion centre (v_j = -v_i) and is normal to a mirror plane holding
the bond: Moriya's rules. ``dm="polar"``, D_ij = c_ij r^_ij (magnetic modules saved
before 2026-12-07 load with it), is odd under inversion. The output layers start at zero: at
initialisation E_mag = 0 and every derivative of it is 0, so base + E_mag is the base
model exactly."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .graph import MagneticBatch

N_ELEMENTS = 119  # embedding rows, indexed by atomic number
# The magnetic modules' dtype, whatever the base model's: the output layers fitted in
# closed form hold large weights whose terms cancel, and in float32 E_mag lost three
# digits (a review's run: its energy jittered apart from its forces, and an NVE run of a
# float32 SevenNet with them drifted far more than without).
MAGNETIC_DTYPE = torch.float64
# eV: the couplings are ENERGY_SCALE x an MLP output, so O(1) weights give the meV-scale
# exchange energies of the data and an optimizer step of ~lr moves them by ~lr x 10 meV
ENERGY_SCALE = 0.01
DM_FORMS = ("axial", "polar")  # the Dzyaloshinskii-Moriya vector's forms (module docstring)


def envelope(r: torch.Tensor, cutoff: float, switch: float) -> torch.Tensor:
    """1 below cutoff - switch, then a cosine down to 0 at the cutoff (smooth): a plain
    cosine envelope over [0, cutoff] would all but erase the couplings of second
    neighbours (NiO's 180° superexchange at 4.17 Å), which carry the spin energies."""
    x = ((r - (cutoff - switch)) / switch).clamp(0.0, 1.0)
    return 0.5 * (torch.cos(math.pi * x) + 1.0)


def radial_basis(r: torch.Tensor, cutoff: float, n: int, cut: torch.Tensor) -> torch.Tensor:
    """Gaussians of width cutoff / n centred on (0, cutoff], times the envelope ``cut``
    (:func:`envelope` of r): (E, n). O(1) and local in r, so couplings at different
    neighbour distances (NiO's first and second neighbours) are told apart from the
    first steps of training."""
    centres = torch.linspace(cutoff / n, cutoff, n, dtype=r.dtype, device=r.device)
    gauss = torch.exp(-((r[:, None] - centres) * (n / cutoff)).square())
    return gauss * cut[:, None]


def _mlp(n_in: int, width: int, n_out: int) -> nn.Sequential:
    out = nn.Linear(width, n_out)
    nn.init.zeros_(out.weight)  # the exact-base start
    nn.init.zeros_(out.bias)
    return nn.Sequential(nn.Linear(n_in, width), nn.SiLU(), out)


class MagneticEnergy(nn.Module):
    def __init__(self, cutoff: float = 5.0, n_basis: int = 8, width: int = 32, spin_orbit: bool = False,
                 switch: float = 1.0, dm: str = "axial"):
        super().__init__()
        if dm not in DM_FORMS:
            raise ValueError(f"dm must be one of {DM_FORMS}, got {dm!r}")
        self.cutoff, self.n_basis, self.width, self.spin_orbit, self.dm = float(cutoff), n_basis, width, spin_orbit, dm
        self.switch = min(float(switch), self.cutoff)
        self.embed = nn.Embedding(N_ELEMENTS, width)
        self.env = nn.Linear(n_basis, width, bias=False)
        self.node = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU())
        self.pair = _mlp(n_basis + 2 * width, width, 3 if spin_orbit else 1)
        self.onsite = _mlp(width, width, 2)
        if spin_orbit and dm == "axial":  # g_ik of the docstring's v_i, from the edge's features
            self.dm_weight = nn.Linear(width, 1, bias=False)

    def config(self) -> dict:
        return {"cutoff": self.cutoff, "n_basis": self.n_basis, "width": self.width, "spin_orbit": self.spin_orbit,
                "switch": self.switch, "dm": self.dm}

    def geometry(self, batch: MagneticBatch, positions: torch.Tensor, offsets: Optional[torch.Tensor] = None):
        """Edge vectors and lengths, the envelope, the radial basis, invariant edge
        features (E, width: of r_ij and z_j) and node features (n, width); ``offsets``
        (default the batch's): the edges' cell offsets.
        Rows are gathered by ``index_select``: its gradient is one ``index_add``, where
        indexing's is an accumulating ``index_put`` (a sort on GPUs)."""
        i, j = batch.edges
        offsets = batch.offsets if offsets is None else offsets
        vec = positions.index_select(0, j) - positions.index_select(0, i) + offsets.to(positions.dtype)
        r = vec.norm(dim=1)
        cut = envelope(r, self.cutoff, self.switch)
        basis = radial_basis(r, self.cutoff, self.n_basis, cut)
        emb = self.embed(batch.numbers)
        edge = self.env(basis) * emb.index_select(0, j)
        env = torch.zeros_like(emb).index_add_(0, i, edge)
        return vec, r, cut, basis, edge, self.node(torch.cat([emb, env], dim=1))

    def atom_energies(self, batch: MagneticBatch, positions: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
        """Per-atom magnetic energy (n,): the on-site terms plus half of each pair term."""
        return self._atom_energies_and_nodes(batch, positions, moments)[0]

    def _atom_energies_and_nodes(self, batch: MagneticBatch, positions: torch.Tensor, moments: torch.Tensor,
                                 offsets: Optional[torch.Tensor] = None):
        i, j = batch.edges
        vec, r, cut, basis, edge, node = self.geometry(batch, positions, offsets)
        ni, nj = node.index_select(0, i), node.index_select(0, j)
        coupling = self.pair(torch.cat([basis, ni + nj, ni * nj], dim=1)) * (ENERGY_SCALE * cut)[:, None]
        mi, mj = moments.index_select(0, i), moments.index_select(0, j)
        pair = coupling[:, 0] * (mi * mj).sum(1)
        if self.spin_orbit:
            unit = vec / r[:, None]
            dm = self._dm_vectors(batch.edges, unit, edge, len(node))
            pair = (pair + coupling[:, 1] * (dm * torch.linalg.cross(mi, mj)).sum(1)
                    + coupling[:, 2] * (mi * unit).sum(1) * (mj * unit).sum(1))
        a, b = self.landau(node)
        m2 = moments.square().sum(1)
        onsite = a * m2 + b * m2.square()
        return onsite + 0.5 * torch.zeros_like(onsite).index_add_(0, i, pair), node

    def landau(self, node: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The on-site a_i and b_i (n,) of atoms with ``node`` features (``geometry``'s
        last). b is clamped, not a softplus: exactly 0 at the start yet trainable (the
        clamp passes the gradient at 0), and never negative."""
        a, b = (ENERGY_SCALE * self.onsite(node)).unbind(1)
        return a, b.clamp(min=0)

    def _dm_vectors(self, edges: torch.Tensor, unit: torch.Tensor, edge: torch.Tensor, n: int) -> torch.Tensor:
        """D_ij / c_ij (E, 3) of the ``n`` atoms' ``edges``: r^_ij x (v_i + v_j), or r^_ij
        where ``dm`` is "polar"."""
        if self.dm == "polar":
            return unit
        i, j = edges
        v = unit.new_zeros(n, 3).index_add_(0, i, self.dm_weight(edge) * unit)
        return torch.linalg.cross(unit, v.index_select(0, i) + v.index_select(0, j))

    def forward(self, batch: MagneticBatch, positions: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
        """Energy per frame (n_frames,)."""
        return _per_frame(batch, self.atom_energies(batch, positions, moments))

    def strained(self, batch: MagneticBatch, strain: torch.Tensor) -> torch.Tensor:
        """Energy per frame of the batch's positions and cell offsets strained by ``strain``
        (3, 3), with the frames' own neighbours."""
        dtype = self.embed.weight.dtype
        stretch = (torch.eye(3, dtype=dtype) + strain.to(dtype)).to(batch.positions.device)
        atoms, _ = self._atom_energies_and_nodes(batch, batch.positions.to(dtype) @ stretch, batch.moments.to(dtype),
                                                 batch.offsets.to(dtype) @ stretch)
        return _per_frame(batch, atoms)

    def energy_and_forces(self, batch: MagneticBatch, create_graph: bool = False, with_nodes: bool = False
                          ) -> Tuple[torch.Tensor, ...]:
        """(energy per frame, forces -dE/dR, magnetic forces -dE/dm), and with
        ``with_nodes`` the node features too (a moment head reads them: not built twice)."""
        out = self.outputs(batch, create_graph)
        return tuple(out[k] for k in ("energy", "forces", "magforces") + (("node",) if with_nodes else ()))

    def outputs(self, batch: MagneticBatch, create_graph: bool = False, stress: bool = False
                ) -> Dict[str, torch.Tensor]:
        """energy per frame, forces -dE/dR, magnetic forces -dE/dm, the node features (a
        moment head reads them: not built twice) and, with ``stress``, the stress per
        frame (3, 3; eV/Å^3, ASE's sign: (1/V) dE/dstrain, 0 where the frame has no
        volume), by a symmetric strain of the positions and cell offsets (MACE's way)."""
        dtype = self.embed.weight.dtype
        positions = batch.positions.to(dtype).detach().requires_grad_(True)
        moments = batch.moments.to(dtype).detach().requires_grad_(True)
        strain = positions.new_zeros((batch.n_frames, 3, 3), requires_grad=True) if stress else None
        with torch.enable_grad():
            strained, offsets = positions, batch.offsets.to(dtype)
            if stress:
                sym = 0.5 * (strain + strain.transpose(1, 2))
                strained = positions + torch.einsum("ni,nij->nj", positions, sym[batch.frame])
                offsets = offsets + torch.einsum("ei,eij->ej", offsets, sym[batch.frame[batch.edges[0]]])
            atoms, node = self._atom_energies_and_nodes(batch, strained, moments, offsets)
            energy = _per_frame(batch, atoms)
            grads = torch.autograd.grad(energy.sum(), (positions, moments) + ((strain,) if stress else ()),
                                        create_graph=create_graph)
        out = {"energy": energy, "forces": -grads[0], "magforces": -grads[1], "node": node}
        if stress:
            volume = batch.volume.to(dtype)
            out["stress"] = grads[2] / torch.where(volume > 0, volume, torch.inf)[:, None, None]
        return out


def _per_frame(batch: MagneticBatch, atoms: torch.Tensor) -> torch.Tensor:
    return torch.zeros(batch.n_frames, dtype=atoms.dtype, device=atoms.device).index_add_(0, batch.frame, atoms)
