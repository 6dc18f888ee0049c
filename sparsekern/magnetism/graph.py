"""The magnetic module's input, independent of the model family: positions, atomic
numbers, moments as 3-vectors and a neighbour list in the module's own cutoff, built
once per frame (like a family's graph) and collated into one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import torch

from ..integrations.cuda_graphs import padding_edges

AXIS = np.array([0.0, 0.0, 1.0])  # collinear moments are moments along this axis
# Neighbours are listed up to cutoff / SKIN: the fit's strain prior compresses each frame by up
# to 2 % (fit.STRAINS) with its own neighbours, and pairs that then come within the cutoff
# must be there. Beyond the cutoff every term of E_mag is exactly 0 (the envelope).
SKIN = 0.98


def as_vectors(moments, natoms: int, what: str = "moments") -> np.ndarray:
    """(n, 3) moments from collinear scalars (n,) (along ``AXIS``) or 3-vectors (n, 3)."""
    m = np.asarray(moments, dtype=np.float64)
    if m.shape not in ((natoms,), (natoms, 3)):
        raise ValueError(f"{what} have shape {m.shape}, expected ({natoms},) (collinear) or ({natoms}, 3)")
    if not np.isfinite(m).all():
        raise ValueError(f"{what} hold NaN or infinity")
    return m[:, None] * AXIS if m.ndim == 1 else m


@dataclass
class MagneticGraph:
    positions: np.ndarray  # (n, 3) Å
    numbers: np.ndarray  # (n,)
    moments: np.ndarray  # (n, 3) μB
    edges: np.ndarray  # (2, E): i, j
    offsets: np.ndarray  # (E, 3) Å: r_ij = positions[j] - positions[i] + offsets
    volume: float = 0.0  # Å^3, the cell's where periodic in 3 directions (a stress divides by it)


def magnetic_graph(atoms, cutoff: float, moments=None) -> MagneticGraph:
    """``atoms`` with ``moments`` (default: its initial magnetic moments)."""
    from ase.neighborlist import neighbor_list

    m = atoms.get_initial_magnetic_moments() if moments is None else moments
    i, j, shift = neighbor_list("ijS", atoms, cutoff / SKIN)
    offsets = shift.astype(np.float64) @ np.asarray(atoms.cell, dtype=np.float64)
    volume = float(abs(atoms.cell.volume)) if atoms.pbc.all() else 0.0
    return MagneticGraph(np.array(atoms.positions, dtype=np.float64), np.array(atoms.numbers),
                         as_vectors(m, len(atoms)), np.stack([i, j]), offsets, volume)


@dataclass
class MagneticBatch:
    positions: torch.Tensor
    numbers: torch.Tensor
    moments: torch.Tensor
    edges: torch.Tensor
    offsets: torch.Tensor
    frame: torch.Tensor  # (n,) frame index of each atom
    n_frames: int
    volume: torch.Tensor  # (n_frames,) Å^3: what a stress divides by (0: no cell)


def collate(graphs: Sequence[MagneticGraph], device, dtype=torch.float64) -> MagneticBatch:
    starts = np.cumsum([0] + [len(g.numbers) for g in graphs])[:-1]

    def cat(key):
        return torch.as_tensor(np.concatenate([getattr(g, key) for g in graphs]), device=device)

    edges = torch.as_tensor(np.concatenate([g.edges + s for g, s in zip(graphs, starts)], axis=1), device=device)
    frame = torch.cat([torch.full((len(g.numbers),), k, dtype=torch.long) for k, g in enumerate(graphs)])
    return MagneticBatch(cat("positions").to(dtype), cat("numbers").long(), cat("moments").to(dtype),
                         edges.long(), cat("offsets").to(dtype), frame.to(device), len(graphs),
                         torch.tensor([g.volume for g in graphs], dtype=dtype, device=device))


PADDED = "magnetic_"  # the prefix of a padded batch's keys among the base family's inputs


def pad(batch: MagneticBatch, atoms: int, edges: int, cutoff: float) -> Dict[str, torch.Tensor]:
    """``batch`` padded to ``atoms`` atoms and ``edges`` edges, as inputs keyed
    ``magnetic_*`` beside the base family's padded ones (whose padding atoms these are,
    after the real ones): the padding atoms at the origin with zero moments in a frame of
    their own, the padding edges within their pairs, 2 ``cutoff`` long (zero
    coupling and moments: nothing of theirs reaches a real atom or frame), that frame's
    volume 1 (its stress is 0)."""
    n, e = batch.positions.shape[0], batch.edges.shape[1]
    if atoms < n + 2 or edges < e:
        raise ValueError(f"magnetic pad: {n} atoms (and 2 padding atoms) and {e} edges do not fit a capacity of "
                         f"{atoms} atoms and {edges} edges")
    offsets = batch.offsets.new_zeros(edges - e, 3)
    offsets[:, 0] = 2 * cutoff
    padded = {"positions": torch.cat([batch.positions, batch.positions.new_zeros(atoms - n, 3)]),
              "numbers": torch.cat([batch.numbers, batch.numbers.new_zeros(atoms - n)]),
              "moments": torch.cat([batch.moments, batch.moments.new_zeros(atoms - n, 3)]),
              "edges": torch.cat([batch.edges, padding_edges(n, atoms - n, edges - e, batch.edges)], 1),
              "offsets": torch.cat([batch.offsets, offsets]),
              "frame": torch.cat([batch.frame, batch.frame.new_full((atoms - n,), batch.n_frames)]),
              "volume": torch.cat([batch.volume, batch.volume.new_ones(1)])}
    return {PADDED + key: value for key, value in padded.items()}


def unpad(inputs: Dict[str, torch.Tensor], n_frames: int) -> MagneticBatch:
    """The padded batch in ``inputs`` (:func:`pad`'s keys), of ``n_frames`` frames with the padding's."""
    return MagneticBatch(*(inputs[PADDED + key] for key in _TENSORS), n_frames, inputs[PADDED + "volume"])


_TENSORS = ("positions", "numbers", "moments", "edges", "offsets", "frame")
