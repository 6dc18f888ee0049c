"""Labelled frames for fine-tuning (extended XYZ, MACE's key conventions) and the
per-element energy references (E0s) chosen the way MACE's ``--E0s`` chooses them."""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..magnetism.labels import read_moment_labels


@dataclass
class Frame:
    atoms: object  # ase.Atoms
    energy: float  # eV
    forces: np.ndarray  # (n, 3) eV/Å
    magmom: Optional[np.ndarray] = None  # (n, 3) μB, with --magmom_key (also the atoms' initial moments)
    magforces: Optional[np.ndarray] = None  # (n, 3) eV/μB, -dE/dm, with --magforces_key (NaN: unlabelled)
    stress: Optional[np.ndarray] = None  # (3, 3) eV/Å^3, ASE's sign, with --stress_weight (where labelled)
    weights: Dict[str, float] = field(default_factory=dict)  # MACE's per-frame weights by label (absent: 1)


def _lookup(atoms, key: str, kind: str):
    """MACE's lookup: ``atoms.info`` (energy, stress) / ``atoms.arrays`` (forces); ASE moves
    its properties' columns (``energy``, ``free_energy``, ``forces``, ``stress``...) into a
    SinglePointCalculator, so look there too. None where the frame has no such label."""
    store = atoms.arrays if kind == "forces" else atoms.info
    if key in store:
        return store[key]
    return getattr(atoms.calc, "results", {}).get(key)  # (any of ASE's properties: free_energy too)


def _number(value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number: {value!r}") from None


def _finite(value, what: str) -> float:
    number = _number(value, what)
    if not np.isfinite(number):
        raise ValueError(f"{what} is {number}: not a finite number")
    return number


LABELS = ("energy", "forces", "stress", "magforces", "magmom")  # what the loss trains, each weighed by frame


def type_weights(spec: Optional[str]) -> Dict[str, float]:
    """MACE's ``--config_type_weights``, a dict '{config_type: weight}' (None: every type 1;
    a type given as a number is its text, as ``config_type``), or a one-line error."""
    if spec is None:
        return {}
    try:
        raw = ast.literal_eval(spec)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # (TypeError: '{[1]: 2}')
        raw = None
    if not isinstance(raw, dict) or not all(
            (isinstance(k, str) or _plain_number(k)) and _plain_number(v) and np.isfinite(v) and v >= 0
            for k, v in raw.items()):
        raise ValueError(f"--config_type_weights: expected a dict of config_type -> weight >= 0, like "
                         f"'{{\"Default\": 1.0, \"surface\": 10.0}}', got {spec!r}")
    return {str(k): float(v) for k, v in raw.items()}


def _plain_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def config_type(atoms) -> str:
    """MACE's ``config_type`` of a frame (Default where it has none; as text: extended XYZ
    reads ``config_type=1`` as a number)."""
    return str(atoms.info.get("config_type", "Default"))


def is_isolated(atoms) -> bool:
    """MACE's isolated-atom frame: one atom, config_type IsolatedAtom (its energy an E0)."""
    return len(atoms) == 1 and atoms.info.get("config_type") == "IsolatedAtom"


def _weights(atoms, where: str, by_type: Dict[str, float], stress_kind: Optional[str], virials: bool
             ) -> Dict[str, float]:
    """MACE's per-frame weights of each label the loss trains, those other than 1: the
    frame's (``config_weight`` times ``by_type``'s weight of its ``config_type``) times the
    label's (``config_<label>_weight``; a stress read as virials: ``config_virials_weight``).
    Under MACE's virials loss (``virials``) the stress's times (V/N)^2: its term counts the
    virials per atom, (W - W_ref) / N = -(S - S_ref) V / N."""
    def weight(key: str) -> float:
        value = atoms.info.get(key, 1.0)
        if not (_plain_number(value) and np.isfinite(value) and value >= 0):
            shown = repr(value) if isinstance(value, str) else value
            raise ValueError(f"{where}: {key}={shown}: a weight must be a finite number >= 0")
        return float(value)

    read = {"config_weight", *(f"config_{label}_weight" for label in (*LABELS, "virials"))}
    unread = [f"{k}={v}" for k, v in atoms.info.items() if k.startswith("config_") and k.endswith("_weight")
              and k not in read and not (_plain_number(v) and v == 1)]
    if unread:
        raise ValueError(f"{where}: {', '.join(unread)}: weighs no label sparsekern trains (config_weight, "
                         f"config_<label>_weight of {', '.join((*LABELS, 'virials'))})")
    frame = weight("config_weight") * by_type.get(config_type(atoms), 1.0)
    weights = {label: frame * weight(f"config_{(stress_kind or label) if label == 'stress' else label}_weight")
               for label in LABELS}
    if virials and stress_kind:
        weights["stress"] *= (abs(atoms.cell.volume) / len(atoms)) ** 2
    return {label: w for label, w in weights.items() if w != 1.0}


def _check_cell(atoms, where: str) -> None:
    """A periodic direction needs a cell vector, and a cell periodic in all three a volume
    (else the neighbour list fails later, naming no frame)."""
    lengths = np.linalg.norm(atoms.cell.array, axis=1)
    if any(p and length < 1e-6 for p, length in zip(atoms.pbc, lengths)) or (
            atoms.pbc.all() and abs(atoms.cell.volume) < 1e-6):
        raise ValueError(f"{where}: periodic (pbc {atoms.pbc.tolist()}) with a degenerate cell "
                         f"{atoms.cell.array.tolist()}")


def _label(atoms, key: str, where: str, kind: str, images: Sequence, partial: bool):
    """``_lookup``'s label, which every frame must have; with ``partial``, where a frame
    has none, MACE's placeholder (0) and the label's weight 0 (MACE's data loader's way)."""
    value = _lookup(atoms, key, kind)
    if value is not None:
        return value, False
    if kind == "forces" and len(atoms) == 1:  # (an isolated atom's file often has none)
        return np.zeros((1, 3)), False  # one atom (a cell's images move with it): its force is 0, exactly
    if partial:
        return (np.zeros((len(atoms), 3)) if kind == "forces" else 0.0), True
    if any(_lookup(other, key, kind) is not None for other in images):
        raise KeyError(f"{where}: no {kind} under key {key!r}, which other frames have: sparsekern finetune "
                       f"trains frames with every label (mace-train, as MACE, gives a missing label weight 0)")
    raise KeyError(f"{where}: no {kind} under key {key!r} (use --{kind}_key to name it; "
                   f"info keys: {sorted(atoms.info)}, array keys: {sorted(atoms.arrays)})")


def read_frames(path, energy_key: str = "REF_energy", forces_key: str = "REF_forces",
                limit: Optional[int] = None, magmom_key: Optional[str] = None,
                magforces_key: Optional[str] = None, stress_key: Optional[str] = None,
                virials_key: Optional[str] = None, isolated: Optional[Dict[int, Optional[float]]] = None,
                by_type: Optional[Dict[str, float]] = None, virials: bool = False,
                spin_orbit: bool = False, partial: bool = False) -> List[Frame]:
    """The first ``limit`` configurations of an extended-XYZ file with their labels (moments and
    magnetic forces where their keys are given; stresses, under ``stress_key`` or as
    virials under ``virials_key``, in the frames that have one). Given an ``isolated``
    dict, MACE's isolated-atom frames (one atom, ``config_type`` IsolatedAtom: a
    reference energy, not a configuration to fit) are set aside into it, {Z: energy or
    None}, as MACE's data loader does. Each frame's weights are MACE's (``_weights``;
    ``by_type``: ``--config_type_weights``; ``virials``: ``--loss virials``). ``spin_orbit``:
    the moments must be 3-vectors (``read_moment_labels``). ``partial``: a frame may lack its
    energy or forces (as MACE reads them: weight 0), else every frame needs both."""
    from ase.io import read

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"data file {path} is a folder, not an extended-XYZ file")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        images = read(path, index=":")  # (all: ``limit`` counts the configurations, not isolated atoms)
    except Exception as exc:
        raise ValueError(f"could not read {path} as extended XYZ: {exc}") from exc
    if not images:
        raise ValueError(f"{path} holds no frames")
    frames = []
    for i, atoms in enumerate(images):
        where = f"{path} frame {i}"
        if isolated is not None and is_isolated(atoms):
            label = _lookup(atoms, energy_key, "energy")
            if label is not None or int(atoms.numbers[0]) not in isolated:  # (an energy is not forgotten)
                isolated[int(atoms.numbers[0])] = None if label is None else _finite(label, f"{where}: energy")
            continue
        if limit is not None and len(frames) == limit:
            continue  # (the isolated atoms further on are still read)
        if len(atoms) == 0:
            raise ValueError(f"{where}: no atoms")
        _check_cell(atoms, where)
        energy, no_energy = _label(atoms, energy_key, where, "energy", images, partial)
        forces, no_forces = _label(atoms, forces_key, where, "forces", images, partial)
        energy, forces = _number(energy, f"{where}: energy {energy_key!r}"), np.asarray(forces, dtype=np.float64)
        if forces.shape != (len(atoms), 3):
            raise ValueError(f"{where}: forces {forces_key!r} have shape {forces.shape}, expected ({len(atoms)}, 3)")
        _check_finite_and_apart(atoms, energy, forces, where, energy_key, forces_key)
        moment_labels = (read_moment_labels(atoms, where, magmom_key, magforces_key, spin_orbit) if magmom_key
                         else (None, None))
        _check_moment_bounds(*moment_labels, where, magmom_key, magforces_key)
        stress, kind = _stress(atoms, stress_key, virials_key, where, virials)
        weights = _weights(atoms, where, by_type or {}, kind, virials)
        weights.update({label: 0.0 for label, missing in (("energy", no_energy), ("forces", no_forces)) if missing})
        frames.append(Frame(atoms, energy, forces, *moment_labels, stress=stress, weights=weights))
    if not frames:
        raise ValueError(f"{path} holds isolated atoms only (MACE's IsolatedAtom frames, set aside; "
                         f"--keep_isolated_atoms keeps them)")
    return frames


def _stress(atoms, stress_key: Optional[str], virials_key: Optional[str], where: str, virials: bool = False
            ) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """The frame's stress label as a 3x3 tensor (eV/Å^3, ASE's sign): under ``stress_key``,
    else -W/V from MACE's virials W (eV) under ``virials_key`` (under MACE's virials loss,
    ``virials``: the virials first, as MACE's reads them); None where it has neither.
    Also which it was read as (stress, virials).
    Either given as 9 values or as ASE's Voigt 6, xx yy zz yz xz xy, as MACE reads them."""
    from ase.stress import voigt_6_to_full_3x3_stress

    keys = ((stress_key, "stress"), (virials_key, "virials"))
    for key, kind in (keys[::-1] if virials else keys):
        raw = _lookup(atoms, key, kind) if key else None
        if raw is None:
            continue
        try:
            values = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {kind} {key!r} is not numbers: {raw!r}") from None
        if values.size not in (6, 9):
            raise ValueError(f"{where}: {kind} {key!r} has {values.size} values, expected 6 (Voigt) or 9")
        if not np.isfinite(values).all():
            raise ValueError(f"{where}: {kind} {key!r} holds NaN or infinity")
        if not atoms.pbc.all() or abs(atoms.cell.volume) < 1e-6:
            raise ValueError(f"{where}: {kind} {key!r} on a frame that is not periodic in 3 directions")
        tensor = voigt_6_to_full_3x3_stress(values) if values.size == 6 else values.reshape(3, 3)
        stress = tensor if kind == "stress" else -tensor / abs(atoms.cell.volume)
        _check_bound(np.abs(stress).max(), MAX_STRESS, where, f"{kind} {key!r}", "eV/Å^3 (a component of the stress)")
        return stress, kind
    return None, None


def valid_indices(n: int, fraction: float, seed: int) -> List[int]:
    """Which of ``n`` training frames ``--valid_fraction`` holds out: MACE's
    ``random_train_valid_split`` (the same frames for the same seed), at least one."""
    order = list(range(n))
    np.random.default_rng(seed).shuffle(order)
    return order[min(n - int(fraction * n), n - 1):]


def split_valid(train: Sequence[Frame], fraction: float, seed: int) -> tuple:
    """(train, valid): ``fraction`` of the frames held out, as MACE's ``--valid_fraction``."""
    if len(train) < 2:
        raise ValueError(f"--valid_fraction needs at least 2 training frames, got {len(train)}")
    held = valid_indices(len(train), fraction, seed)
    kept = sorted(set(range(len(train))) - set(held))
    return [train[i] for i in kept], [train[i] for i in held]


def data_sha256_16(*paths) -> str:
    """The first 16 hex digits of the SHA-256 of the files' contents, in order (None: skipped)."""
    h = hashlib.sha256()
    for p in paths:
        if p:
            h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def _identity(frame: Frame) -> bytes:
    atoms = frame.atoms
    return b"".join(np.ascontiguousarray(a).tobytes() for a in (atoms.numbers, atoms.positions, atoms.cell.array))


def shared_frames(frames: Sequence[Frame], train: Sequence[Frame]) -> int:
    """How many of ``frames`` are training frames too (same atoms, positions and cell)."""
    seen = {_identity(f) for f in train}
    return sum(_identity(f) in seen for f in frames)


MIN_DISTANCE = 0.3  # Å: closer atoms are a broken frame, not chemistry (H2's bond is 0.74 Å)
# Labels beyond these are broken (a unit or parsing error), not physics: they would pass as
# finite and diverge the loss minutes later. Generous: the largest DFT labels are ~10 times
# smaller or less (all-electron total energies per atom: Te -1.8e5 eV, U -7.6e5 eV, the
# heaviest elements ~ -1.5e6 eV; forces of ~1e2 eV/Å in close collisions, stresses of
# ~1 eV/Å^3 = 160 GPa at extreme compression).
MAX_ENERGY_PER_ATOM = 1e7  # eV
MAX_FORCE = 1e4  # eV/Å, any component
MAX_STRESS = 1e3  # eV/Å^3, any component
MAX_MOMENT = 1e2  # μB, any component (the largest atomic moments, of the heavy rare earths, are ~10 μB)
MAX_MAGFORCE = 1e4  # eV/μB, any component (-dE/dm: ~0.01-1 eV/μB in DFT)


def _check_bound(size: float, bound: float, where: str, what: str, unit: str) -> None:
    if size > bound:
        raise ValueError(f"{where}: {what} beyond physical bounds: {size:.3g} {unit} (more than {bound:g}; "
                         f"a broken label?)")


def _check_moment_bounds(moments: Optional[np.ndarray], magforces: Optional[np.ndarray], where: str,
                         magmom_key: Optional[str], magforces_key: Optional[str]) -> None:
    """Moment and magnetic-force labels (finite, ``read_moment_labels`` checked that;
    collinear magnetic forces NaN across the axis) within physical bounds."""
    if moments is not None and len(moments):
        _check_bound(np.abs(moments).max(), MAX_MOMENT, where, f"moments {magmom_key!r}", "μB (a component)")
    if magforces is not None and len(magforces):
        _check_bound(np.nanmax(np.abs(magforces)), MAX_MAGFORCE, where, f"magnetic forces {magforces_key!r}",
                     "eV/μB (a component)")


def _check_finite_and_apart(atoms, energy: float, forces: np.ndarray, where: str, energy_key: str,
                            forces_key: str) -> None:
    """NaN or infinite labels or positions train a model of NaN, labels beyond physical
    bounds diverge it; overlapping atoms give energies no model should fit. All are
    refused before any slow work."""
    from ase.neighborlist import neighbor_list

    for what, values in ((f"energy {energy_key!r}", energy), (f"forces {forces_key!r}", forces),
                         ("positions", atoms.positions)):
        if not np.isfinite(values).all():
            raise ValueError(f"{where}: {what} hold NaN or infinity")
    _check_bound(abs(energy) / len(atoms), MAX_ENERGY_PER_ATOM, where, f"energy {energy_key!r}", "eV per atom")
    _check_bound(np.abs(forces).max(), MAX_FORCE, where, f"forces {forces_key!r}", "eV/Å (a component)")
    close = neighbor_list("d", atoms, MIN_DISTANCE)
    if close.size:
        raise ValueError(f"{where}: atoms {close.min():.3f} Å apart (closer than {MIN_DISTANCE} Å): overlapping atoms")


def composition(frames: Sequence[Frame], zs: Sequence[int]) -> np.ndarray:
    """(frames, elements) atom counts."""
    return np.array([[np.count_nonzero(f.atoms.numbers == z) for z in zs] for f in frames], dtype=np.float64)


def _lstsq(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    # minimum-norm solution, as MACE: with a single composition (one molecule) only the
    # total per molecule is determined, and that is all the energies need; each frame's
    # row weighed as the loss weighs its energy
    root = np.sqrt(weights)
    return np.linalg.lstsq(a * root[:, None], b * root, rcond=None)[0]


def _parse_e0s_dict(spec: str) -> Dict[int, float]:
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"--E0s: JSON file not found: {spec}")
        try:
            raw = json.loads(Path(spec).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"--E0s {spec}: not JSON ({exc})") from None
    else:
        try:
            raw = ast.literal_eval(spec)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"--E0s: expected foundation, estimated, average, isolated, a .json file or a dict "
                             f"like '{{1: -13.6, 8: -2041.8}}', got {spec!r}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"--E0s: expected a dict of atomic number -> energy, got {spec!r}")
    try:
        e0s = {int(k): float(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise ValueError(f"--E0s {spec}: expected atomic numbers -> energies (eV), got {raw!r}") from None
    if not all(np.isfinite(v) for v in e0s.values()):
        raise ValueError(f"--E0s {spec}: energies must be finite numbers, got {raw!r}")
    return e0s


REFIT_E0S = ("estimated", "average")  # fitted to the data: refitted after training (trainer)


def check_e0_fit(spec: str, frames: Sequence[Frame]) -> None:
    """``--E0s average`` replaces each training element's E0 by a fit to the energies that
    weigh > 0: an element in none of them would get 0 (the minimum-norm fit), so it is
    refused. (``estimated`` fits a correction: such an element keeps the model's E0.)"""
    if spec != "average":
        return
    weighed = {int(z) for f in frames if f.weights.get("energy", 1.0) > 0 for z in f.atoms.numbers}
    missing = sorted({int(z) for f in frames for z in f.atoms.numbers} - weighed)
    if missing:
        raise ValueError(f"--E0s average: every training energy holding atomic numbers {missing} weighs 0 (the "
                         f"frames' config weights), so their E0s cannot be fitted: give them (--E0s '{{Z: E0}}') "
                         f"or use --E0s estimated")


def check_e0s(spec: str) -> str:
    """``--E0s`` as its rule (a keyword in any case: MACE lowercases them) or its energies,
    or a one-line error (before any model loads)."""
    if spec.lower() in ("foundation", "isolated", *REFIT_E0S):
        return spec.lower()
    _parse_e0s_dict(spec)
    return spec


def energy_shift(spec: str, frames: Sequence[Frame], zs: Sequence[int],
                 model_e0s: Callable[[Sequence[int]], Dict[int, float]],
                 predict_energies: Callable[[], np.ndarray]) -> Dict[int, float]:
    """Per-element energy added to the model's predictions (fixed during training), by
    MACE's ``--E0s`` rules:

    - ``foundation``: keep the model's own reference (shift 0);
    - ``estimated``: least squares of the training residuals E_ref - E_model on the
      composition (MACE's ``estimate_e0s_from_foundation``): the foundation model's
      reference is corrected to the data's (e.g. rMD17 molecules vs SevenNet-0);
    - ``average``: least squares of the training energies themselves (MACE's
      ``compute_average_E0s``), which replace the model's isolated-atom energies;
    - a dict or ``.json`` file {Z: E0}: these replace the model's isolated-atom energies.
    For the replacing options the shift is new E0 - the model's own E0 (``model_e0s``).
    The fits weigh each frame as the loss weighs its energy (MACE's are unweighted)."""
    zs = [int(z) for z in zs]
    if spec == "foundation":
        return {z: 0.0 for z in zs}
    energies = np.array([f.energy for f in frames])
    weights = np.array([f.weights.get("energy", 1.0) for f in frames])
    if spec == "estimated":
        coef = _lstsq(composition(frames, zs), energies - predict_energies(), weights)
        return {z: float(c) for z, c in zip(zs, coef)}
    if spec == "average":
        new = dict(zip(zs, (float(c) for c in _lstsq(composition(frames, zs), energies, weights))))
    else:
        new = _parse_e0s_dict(spec)
        missing = [z for z in zs if z not in new]
        if missing:
            raise ValueError(f"--E0s: no energy given for atomic numbers {missing} present in the training data")
    own = model_e0s(zs)
    return {z: new[z] - own[z] for z in zs}
