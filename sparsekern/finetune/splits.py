"""A run's frames by split (training, validation, test), read and checked before the
model loads, and MACE's isolated-atom frames set aside."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

from .data import Frame, check_e0_fit, config_type, is_isolated, read_frames, split_valid, type_weights
from .settings import Settings


class Splits(NamedTuple):
    train: List[Frame]
    valid: List[Frame]
    test: List[Frame]
    isolated: Dict[str, Dict[int, Optional[float]]]  # by split, MACE's IsolatedAtom frames set aside: {Z: energy}
    isolated_e0s: Dict[int, float]  # --E0s isolated's: the training file's isolated atoms' (set aside or kept)


def read_splits(settings: Settings) -> Splits:
    """The frames, checked before the model loads. (Test and validation frames may hold
    elements the training frames lack: their energies keep the base's reference, the
    metrics name them: ``untrained_elements``.)"""
    isolated: Dict[str, Dict[int, Optional[float]]] = {"train": {}, "valid": {}, "test": {}}
    by_type = type_weights(settings.config_type_weights)

    def read(split, limit):
        path = getattr(settings, split)
        return read_frames(path, settings.energy_key, settings.forces_key, limit, settings.magmom_key,
                           settings.magforces_key, settings.stress_key, settings.virials_key,
                           None if settings.keep_isolated_atoms else isolated[split], by_type,
                           settings.virials, settings.spin_orbit) if path else []

    train, test = read("train", settings.max_train), read("test", settings.max_test)
    valid = read("valid", settings.max_valid)
    # MACE's E0s from the whole training file (before --valid_fraction), its isolated atoms kept in training or not
    e0s = ({int(f.atoms.numbers[0]): f.energy for f in train if is_isolated(f.atoms)} if settings.keep_isolated_atoms
           else {z: e for z, e in isolated["train"].items() if e is not None})
    _check_types(by_type, train + valid + test, set_aside=any(isolated.values()))
    if settings.valid_fraction is not None:
        train, valid = split_valid(train, settings.valid_fraction, settings.seed)
    if settings.stress_weight and all(f.stress is None for f in train):
        held = " (--valid_fraction held out those that have one)" if any(f.stress is not None for f in valid) else ""
        raise ValueError(f"{settings.flag('stress_weight')}: no training frame has a stress under "
                         f"{settings.stress_key!r} or virials under {settings.virials_key!r}{held} (use --stress_key "
                         f"or --virials_key to name them)")
    if settings.magmom_key and not any(f.magmom.any() for f in train):
        raise ValueError(f"--magmom_key {settings.magmom_key!r}: every training frame's moments are 0, where the "
                         f"magnetic energy and its derivatives vanish: nothing magnetic to fit")
    _check_weighed(settings, train)
    if settings.e0s == "isolated":
        _check_isolated_e0s(train, e0s)
    check_e0_fit(settings.e0s, train)
    return Splits(train, valid, test, {split: atoms for split, atoms in isolated.items() if atoms}, e0s)


def _check_types(by_type: Dict[str, float], frames: Sequence[Frame], set_aside: bool) -> None:
    """A config_type ``--config_type_weights`` weighs (other than 1) that no frame has is a
    misspelling, not a choice: refused, naming those there are (``set_aside``: MACE's
    IsolatedAtom frames too)."""
    present = {config_type(f.atoms) for f in frames} | ({"IsolatedAtom"} if set_aside else set())
    absent = sorted(t for t, w in by_type.items() if w != 1.0 and t not in present)
    if absent:
        raise ValueError(f"--config_type_weights: no frame has config_type {', '.join(map(repr, absent))} (the "
                         f"frames' config_types: {', '.join(map(repr, sorted(present)))})")


def _check_weighed(settings: Settings, train: Sequence[Frame]) -> None:
    """Some training label the loss trains must weigh > 0 (the frames' weights and
    --config_type_weights): else the loss is 0 and the base is saved as the fine-tuned model."""
    trained = {label for stage in {False, settings.stage_two}
               for label, (_, weight) in settings.loss_weights(stage).items() if weight > 0}
    if not any(f.weights.get(label, 1.0) > 0 and (label != "stress" or f.stress is not None)
               for f in train for label in trained):
        raise ValueError(f"every training frame weighs 0 in the loss (its config_weight, config_<label>_weight and "
                         f"--config_type_weights; labels trained: {', '.join(sorted(trained))}): the run would "
                         f"train nothing")


def _check_isolated_e0s(train: Sequence[Frame], e0s: Dict[int, float]) -> None:
    """``--E0s isolated`` needs an isolated-atom energy for every training element."""
    missing = sorted({int(z) for f in train for z in f.atoms.numbers} - set(e0s))
    if missing:
        raise ValueError(f"--E0s isolated: the training file has no IsolatedAtom frame with an energy for atomic "
                         f"numbers {missing}")


def e0s_rule(settings: Settings, frames: Splits) -> str:
    """The ``--E0s`` rule ``energy_shift`` applies: ``isolated`` as the dict of the training
    file's isolated-atom energies (those it has)."""
    if settings.e0s != "isolated":
        return settings.e0s
    return repr(frames.isolated_e0s)


def untrained_elements(train: Sequence[Frame], held: Sequence[Frame]) -> List[int]:
    """The atomic numbers of the ``held`` frames (test, validation) that no training frame
    holds: their per-element energies are the base's, not fitted."""
    return sorted({int(z) for f in held for z in f.atoms.numbers} - {int(z) for f in train for z in f.atoms.numbers})
