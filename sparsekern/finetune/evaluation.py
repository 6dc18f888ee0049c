"""What training and evaluation share: frames as the model's graphs (built once),
batches, predictions with the fixed energy shift, the loss and the error metrics, and
the check of a merged model in its family's own ASE calculator."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..integrations import Family
from ..magnetism.loss import magnetic_errors, magnetic_loss, magnetic_residuals
from .data import LABELS, Frame
from .distributed import Group
from .graphed_step import GraphedSteps, graphed
from .penalty import delta, force_delta, penalty
from .stress import stress_errors, stress_loss, stress_residuals, wanted
from .weights import residual_weights, scored, weighing, weighted


@dataclass
class Sample:
    graph: object
    energy: float
    forces: torch.Tensor
    natoms: int
    shift: float = 0.0  # the fixed per-element energy shift summed over the frame's atoms
    magmom: Optional[torch.Tensor] = None  # (n, 3) μB: the moment labels (with --magmom_key)
    magforces: Optional[torch.Tensor] = None  # (n, 3) eV/μB (with --magforces_key; NaN: unlabelled)
    stress: Optional[torch.Tensor] = None  # (3, 3) eV/Å^3 (with --stress_weight, where labelled)
    weights: Dict[str, float] = field(default_factory=dict)  # MACE's per-frame weights by label (Frame.weights)


@dataclass
class Errors:
    energy_mae_mev_per_atom: Optional[float] = None  # (None where every energy weighs 0)
    energy_rmse_mev_per_atom: Optional[float] = None
    force_mae_mev_per_A: Optional[float] = None
    force_rmse_mev_per_A: Optional[float] = None
    stress_mae_mev_per_A3: Optional[float] = None  # with stress labels
    stress_rmse_mev_per_A3: Optional[float] = None
    magforce_mae_mev_per_muB: Optional[float] = None  # with magnetic-force labels
    magforce_rmse_mev_per_muB: Optional[float] = None
    magmom_mae_muB: Optional[float] = None  # |predicted| vs |label|, with a moment head

    def as_dict(self) -> Dict[str, float]:
        """The errors there are labels for."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def make_samples(family: Family, model, frames: Sequence[Frame], shift: Dict[int, float]) -> List[Sample]:
    """The frames as the model's graphs with their labels; ``shift`` per element (none: 0)."""
    def tensor(a):
        return None if a is None else torch.as_tensor(a)

    samples = [Sample(family.graph(model, f.atoms), f.energy, torch.as_tensor(f.forces), len(f.atoms),
                      magmom=tensor(f.magmom), magforces=tensor(f.magforces), stress=tensor(f.stress),
                      weights=f.weights) for f in frames]
    set_shift(samples, frames, shift)
    return samples


def set_shift(samples: Sequence[Sample], frames: Sequence[Frame], shift: Dict[int, float]) -> None:
    """Each sample's energy shift: ``shift`` (per element, absent: 0) over its frame's atoms."""
    for s, f in zip(samples, frames):
        s.shift = float(sum(shift.get(int(z), 0.0) for z in f.atoms.numbers))


def check_elements(family: Family, model, frames: Sequence[Frame], what: str) -> None:
    known = set(family.numbers(model))
    present = {int(z) for f in frames for z in f.atoms.numbers}
    if not present <= known:
        from ase.data import chemical_symbols

        raise ValueError(f"{what} holds elements the model does not know: "
                         f"{sorted(chemical_symbols[z] for z in present - known)}")


def batches(samples: Sequence[Sample], size: int, order: Optional[torch.Tensor] = None):
    idx = list(range(len(samples))) if order is None else order.tolist()
    for i in range(0, len(idx), size):
        yield [samples[j] for j in idx[i:i + size]]


def shared_batches(samples: Sequence[Sample], size: int, group: Group = Group()) -> List[Tuple[int, list]]:
    """(index, batch) of this rank's batches of ``samples``: every ``group.size``-th."""
    chunks = list(batches(samples, size))
    return [(i, chunks[i]) for i in range(group.rank, len(chunks), group.size)]


def evaluation_size(settings) -> int:
    """Frames per evaluation batch: ``--valid_batch_size``, else ``--batch_size``."""
    return settings.valid_batch_size or settings.batch_size


def map_batches(fn, samples: Sequence[Sample], size: int, group: Group = Group()) -> list:
    """``fn(batch)`` of every batch of ``samples``, in batch order, on every rank; each
    rank computes its ``shared_batches`` (evaluation is sharded as training is)."""
    done = group.gather({i: fn(batch) for i, batch in shared_batches(samples, size, group)})
    return [done[i] for i in range(len(done))]


@contextmanager
def frozen(model: torch.nn.Module):
    """``model``'s trainable parameters frozen for the block's time (evaluation, a
    calculator's call: the positions' gradients only). Frozen, the deltas' values and the
    weights folded with them are kept between calls instead of rebuilt at each (SevenNet-0
    with a 3 % delta: 958 against 554 host ops an energy+forces, benchmarks/NOTES.md)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@contextmanager
def fits_in_memory(batch: List[Sample], what: str, size_flag: str = "--batch_size"):
    """A batch too large for the device's memory (or the host's) as one line that says
    how large it is and which option (``size_flag``) makes it smaller, in place of the
    allocator's traceback."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and not any(
                m in str(exc) for m in ("not enough memory", "out of memory", "can't allocate memory")):
            raise
        atoms = [s.natoms for s in batch]
        raise MemoryError(f"{what} of {len(batch)} frame(s), {sum(atoms)} atoms (the largest {max(atoms)}), does not "
                          f"fit in memory ({str(exc).splitlines()[0][:120]}); use a smaller {size_flag}, smaller "
                          f"frames or a device with more memory") from None


def outputs(family: Family, model, batch: List[Sample], device: str, training: bool,
            graphs: Optional[GraphedSteps] = None) -> Dict[str, torch.Tensor]:
    """The family's outputs by name (energy per frame with its shift, forces, stresses
    where the batch has stress labels, and what else the family predicts: magnetic forces,
    moments); an evaluation batch replayed from ``graphs`` where it can be."""
    with fits_in_memory(batch, "a training batch" if training else "an evaluation batch",
                        "--batch_size" if training else "--valid_batch_size"):
        out = None if graphs is None or training else graphs.predict(batch)
        if out is None:
            out = family.outputs(model, family.collate([s.graph for s in batch], device), training, wanted(batch))
    energy = out["energy"]
    out["energy"] = energy + torch.tensor([s.shift for s in batch], dtype=energy.dtype, device=energy.device)
    return out


def forward(family: Family, model, batch: List[Sample], device: str, training: bool):
    """(energy per frame, with its shift; forces)."""
    out = outputs(family, model, batch, device, training)
    return out["energy"], out["forces"]


def _targets(batch: List[Sample], like: torch.Tensor):
    e = torch.tensor([s.energy for s in batch], dtype=like.dtype, device=like.device)
    n = torch.tensor([s.natoms for s in batch], dtype=like.dtype, device=like.device)
    f = torch.cat([s.forces for s in batch]).to(like)
    return e, n, f


def loss(family: Family, model, batch: List[Sample], settings, whole: Optional[List[Sample]] = None) -> torch.Tensor:
    """MACE's weighted energy-forces loss (``settings``: the trainer's Settings; mean
    squares or Huber's, ``penalty``), plus the stress and magnetic terms where the samples
    have labels, each entry at its frame's weight (``weights.py``). With ``whole``, a
    global batch that ``batch`` is one process's share of: this share's part of the
    whole's loss (sums over ``batch`` divided by counts of ``whole``), so that the parts
    add up to the loss of ``whole``."""
    whole = batch if whole is None else whole
    out = outputs(family, model, batch, settings.device, training=True)
    energy, forces = out["energy"], out["forces"]
    e, n, f = _targets(batch, energy)
    weigh = weighing(batch)

    def per_entry(key, residual):
        return weigh(key, penalty(residual, delta(settings)))

    return (settings.energy_weight * per_entry("energy", (energy - e) / n).sum() / len(whole)
            + settings.forces_weight * weigh("forces", penalty(forces - f, force_delta(settings, f))).sum()
            / (3 * sum(s.natoms for s in whole))
            + stress_loss(out, batch, settings, whole, per_entry)
            + magnetic_loss(out, batch, settings, whole, per_entry))


def residuals(family: Family, model, samples: Sequence[Sample], settings,
              group: Group = Group()) -> Dict[str, torch.Tensor]:
    """Per frame (E - E_ref) / N and its energy shift per atom; all force residuals; the
    stress and magnetic residuals where the family predicts them and the samples have labels;
    under ``--loss universal``, the forces' Huber deltas (``forces_delta``); with per-frame
    weights, each residual's (``{key}_weights``). In batches of ``evaluation_size``."""
    model.eval()

    graphs = graphed(family, model, settings)
    by_weight = weighted(samples)

    def one(batch):
        out = outputs(family, model, batch, settings.device, False, graphs)
        e, n, f = _targets(batch, out["energy"])
        part = {"energy": ((out["energy"].detach() - e) / n).cpu().double(),
                "shift": torch.tensor([s.shift / s.natoms for s in batch], dtype=torch.float64),
                "forces": (out["forces"].detach() - f).cpu().double().reshape(-1)}
        if settings.loss == "universal":  # its forces' deltas follow the labels
            part["forces_delta"] = force_delta(settings, f).cpu().double().reshape(-1)
        more = {**stress_residuals(out, batch), **magnetic_residuals(out, batch)}
        part.update({k: r.detach().cpu().double() for k, r in more.items()})
        if by_weight:
            part.update(residual_weights(batch, [k for k in part if k in LABELS]))
        return part

    with frozen(model):
        parts = map_batches(one, samples, evaluation_size(settings), group)
    return {k: torch.cat([p[k] for p in parts if k in p]) for k in dict.fromkeys(k for p in parts for k in p)}


def errors(res: Dict[str, torch.Tensor]) -> Errors:
    """The errors of the ``residuals`` ``res``: energies (per atom), forces, and the stress
    and magnetic ones where there are; the entries of weight 0 left out (MACE's metrics),
    and so the errors of a label whose every entry weighs 0."""
    res = scored(res)
    found = {}
    for key, name in (("energy", "energy_{}_mev_per_atom"), ("forces", "force_{}_mev_per_A")):
        if key in res:
            found[name.format("mae")] = 1e3 * float(res[key].abs().mean())
            found[name.format("rmse")] = 1e3 * float(res[key].square().mean().sqrt())
    return Errors(**found, **stress_errors(res), **magnetic_errors(res))


def evaluate(family: Family, model, samples: Sequence[Sample], settings, group: Group = Group()) -> Errors:
    return errors(residuals(family, model, samples, settings, group))


def unshifted(res: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The energy and force residuals of ``res`` without the energy shift."""
    kept = {k: v for k, v in res.items() if k.startswith(("energy", "forces"))}
    return {**kept, "energy": res["energy"] - res["shift"]}


def residual_loss(res: Dict[str, torch.Tensor], settings) -> float:
    """``loss`` of the whole set whose ``residuals`` are ``res``, as one batch: each term's
    weight times its mean penalty (the validation loss an epoch is judged by)."""
    weights = {"energy": settings.energy_weight, "forces": settings.forces_weight, "stress": settings.stress_weight,
               "magforces": settings.magforces_weight, "magmom": settings.magmom_weight}
    return sum(w * float((res.get(f"{k}_weights", 1.0) * penalty(res[k], res.get(f"{k}_delta", delta(settings))))
                         .mean()) for k, w in weights.items() if k in res)


def check_merged(family: Family, reference: Sequence[Dict[str, torch.Tensor]], frames: Sequence[Frame], path: Path,
                 device: str) -> dict:
    """The merged file, loaded by the family's own ASE calculator, against the fine-tuned
    model's predictions (``reference``: ``outputs`` per frame, on the host): largest energy
    (eV), force (eV/Å) and, where the frames have stress labels, stress (eV/Å^3) differences."""
    calc = family.calculator(path, device)
    diffs = {}

    def worst(key: str, value: float) -> None:
        diffs[key] = max(diffs.get(key, 0.0), value)

    for ref, frame in zip(reference, frames):
        atoms = frame.atoms.copy()
        atoms.calc = calc
        worst("max_abs_energy_diff_ev", abs(atoms.get_potential_energy() - float(ref["energy"][0])))
        worst("max_abs_force_diff_ev_per_A", float(np.abs(atoms.get_forces() - ref["forces"].numpy()).max()))
        if "stress" in ref:
            worst("max_abs_stress_diff_ev_per_A3",
                  float(np.abs(atoms.get_stress(voigt=False) - ref["stress"][0].numpy()).max()))
    return {"frames": len(frames), **diffs}
