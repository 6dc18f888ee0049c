"""Several named adapters on one loaded base model, PEFT-style: ``load_adapter`` (with
a name), ``set_adapter``, ``disable_adapter``, ``delete_adapter``, ``list_adapters``.

Each loaded adapter keeps its own delta modules, on the model's device; the active
one's sit in the layers' delta slots. A swap re-points the slots at another adapter's
modules (no file I/O, no copying, no re-patching), and sets the base's per-element
energies to the base's plus the adapter's E0 shift (``e0_shift_ev``, which the merged
model of ``sparsekern finetune`` holds). So a model with adapter B active computes
exactly what a base with only B loaded computes, and what B's merged model computes.
ASE calculators made by :func:`adapter_calculator` forget their cached results at each
swap."""

from __future__ import annotations

import json
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from .. import delta_slot
from ..integrations import computing_at, family_of
from .adapters import attach_adapter, check_adaptable, check_base, read_adapter
from .evaluation import frozen

DEFAULT = "default"


class _Slot(NamedTuple):
    """Where one delta of an adapter goes, with the tensors a swap compares (looked up
    once: a swap must not walk the model)."""

    layer: torch.nn.Module
    param: str
    delta: delta_slot.Delta
    base: torch.Tensor  # the base weight it changes
    probe: torch.Tensor  # one of the delta's own tensors (its device and dtype)


@dataclass
class _Adapter:
    path: str
    format: str
    slots: List[_Slot]
    config: object  # the model's fine-tuning settings while it is active (LoRA's)
    e0_shift: Dict[int, float]
    modal: Optional[str]  # the fidelity it was trained at (a SevenNet's modality, a MACE's head): its E0 shift's


@dataclass
class _Record:
    adapters: Dict[str, _Adapter] = field(default_factory=dict)
    active: Optional[str] = None
    e0_base: Optional[torch.Tensor] = None  # the base's per-element energies while a shift is applied
    listeners: list = field(default_factory=list)  # weak references to calculators' reset

    def __getstate__(self) -> dict:
        return {**self.__dict__, "listeners": []}  # weak references neither pickle nor deepcopy


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    active: bool
    format: str
    path: str


def _record(model: torch.nn.Module) -> _Record:
    record = delta_slot.adapters_of(model)
    if record is None:
        record = _Record()
        delta_slot.set_adapters(model, record)
    return record


def _known(record: _Record, name: str) -> _Adapter:
    if name not in record.adapters:
        loaded = ", ".join(repr(n) for n in record.adapters) or "none"
        raise ValueError(f"no adapter named {name!r} (loaded: {loaded})")
    return record.adapters[name]


def _check_slots(model: torch.nn.Module, record: _Record, what: str) -> None:
    """Refuse when the slots hold deltas no named adapter owns (``prepare``'s) or
    merged ones: a swap would drop or double them. (Once adapters are loaded, only the
    layers they change are looked at, so that a swap does not walk the model.)"""
    active = {id(s.delta) for s in record.adapters[record.active].slots} if record.active else set()
    layers = {id(s.layer): s.layer for a in record.adapters.values() for s in a.slots}
    for layer in layers.values() if record.adapters else [m for _, m in model.named_modules()]:
        for _, delta in delta_slot.layer_deltas(layer):
            if delta.merged:
                raise ValueError(f"{what}: the model's adapter is merged; unmerge(model) first")
            if id(delta) not in active:
                raise ValueError(f"{what}: the model has deltas that are no named adapter's (from prepare); "
                                 "use a clean base model")


def _e0_shift(metadata: dict, path) -> Dict[int, float]:
    try:
        shift = {int(z): float(v) for z, v in json.loads(metadata.get("e0_shift_ev", "{}")).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"adapter {path}: its e0_shift_ev is damaged ({exc})") from None
    return {z: v for z, v in shift.items() if v != 0.0}


def _check_shift(model: torch.nn.Module, shift: Dict[int, float], modal: Optional[str], path) -> None:
    """The model has the adapter's fidelity ``modal`` and can take its E0 shift there
    (checked before anything is attached)."""
    family = family_of(model)
    if family is not None and (shift or modal is not None):
        family = computing_at(family, model, modal, f"adapter {path}: its modal")
    if not shift:
        return
    if family is None:
        raise ValueError(f"adapter {path} carries a per-element energy shift, and sparsekern does not know "
                         f"where this model ({type(model).__name__}) keeps its per-element energies")
    missing = sorted(set(shift) - set(family.e0_table(model)[1]))
    if missing:
        raise ValueError(f"adapter {path} shifts the energies of atomic numbers {missing}, which this model lacks")


def _deactivate(model: torch.nn.Module, record: _Record) -> None:
    if record.active is None:
        return
    for slot in record.adapters[record.active].slots:
        delta_slot.detach(slot.layer, slot.param)
    if record.e0_base is not None:
        with torch.no_grad():
            _e0_whole(model, record.adapters[record.active].modal).copy_(record.e0_base)
        record.e0_base = None
    delta_slot.set_config(model, None)
    record.active = None


def _activate(model: torch.nn.Module, record: _Record, name: str) -> None:
    adapter = record.adapters[name]
    for slot in adapter.slots:
        if slot.probe.device != slot.base.device or slot.probe.dtype != slot.base.dtype:
            slot.delta.to(device=slot.base.device, dtype=slot.base.dtype)  # the model moved since: once
        delta_slot.attach(slot.layer, slot.param, slot.delta)
    if adapter.e0_shift:
        record.e0_base = _e0_whole(model, adapter.modal).detach().clone()
        family_of(model).at_fidelity(adapter.modal).fold_shift(model, adapter.e0_shift)  # as the merged model's
    delta_slot.set_config(model, adapter.config)
    record.active = name


def _e0_whole(model: torch.nn.Module, modal: Optional[str]) -> torch.Tensor:
    """The tensor holding ``model``'s per-element energies at ``modal``: the family's table,
    or the tensor it is a row of (one row per fidelity)."""
    table = family_of(model).at_fidelity(modal).e0_table(model)[0]
    return table if table._base is None else table._base


def _notify(record: _Record) -> None:
    """Calculators made by ``adapter_calculator`` drop their cached results."""
    record.listeners = [ref for ref in record.listeners if ref() is not None]
    for ref in record.listeners:
        ref()()


def load_adapter(model: torch.nn.Module, path, trainable: bool = False, name: str = DEFAULT) -> torch.nn.Module:
    """Load an adapter (either format) under ``name``, on a base model (patched here if
    needed); it becomes active if no adapter is (else ``set_adapter`` activates it).
    ``trainable``: its deltas train on. Refuses a name already loaded and an adapter
    made for another base model."""
    check_adaptable(model, "load_adapter")
    if not isinstance(name, str) or not name:
        raise ValueError(f"load_adapter: name must be a non-empty string, got {name!r}")
    record = delta_slot.adapters_of(model)
    if record is not None and name in record.adapters:
        raise ValueError(f"an adapter named {name!r} is already loaded (from {record.adapters[name].path}); "
                         "delete_adapter it first or give another name")
    tensors, metadata = read_adapter(path)
    shift, modal = _e0_shift(metadata, path), metadata.get("modal")
    record = _record(model)
    _check_slots(model, record, "load_adapter")
    check_base(model, path, metadata)
    _check_shift(model, shift, modal, path)
    previous = record.active
    _deactivate(model, record)  # the new adapter attaches into empty slots
    try:
        attach_adapter(model, path, tensors, metadata, trainable)
        slots = [_Slot(layer, param, delta, layer.get_parameter(param), next(delta.parameters()))
                 for _, layer, param, delta in delta_slot.iter_deltas(model)]
        record.adapters[name] = _Adapter(str(path), metadata["format"], slots, delta_slot.config_of(model), shift,
                                         modal)
    finally:
        for _, layer, param, _ in list(delta_slot.iter_deltas(model)):
            delta_slot.detach(layer, param)
        delta_slot.set_config(model, None)
        restore = previous if previous is not None else (name if name in record.adapters else None)
        if restore is not None:
            _activate(model, record, restore)
    _notify(record)
    return model


def set_adapter(model: torch.nn.Module, name: str) -> None:
    """Make the loaded adapter ``name`` the active one (milliseconds: no file I/O)."""
    record = _record(model)
    _known(record, name)
    _check_slots(model, record, "set_adapter")
    if record.active != name:
        _deactivate(model, record)
        _activate(model, record, name)
        _notify(record)


@contextmanager
def disable_adapter(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``with disable_adapter(model):`` the model is exactly its base inside; the adapter
    active before is active again after."""
    record = _record(model)
    _check_slots(model, record, "disable_adapter")
    previous = record.active
    _deactivate(model, record)
    _notify(record)
    try:
        yield model
    finally:
        if record.active is None and previous in record.adapters:
            _activate(model, record, previous)
            _notify(record)


def delete_adapter(model: torch.nn.Module, name: str) -> None:
    """Remove the adapter ``name``; deleting the active one leaves the base model, with
    no adapter active."""
    record = _record(model)
    _known(record, name)
    if record.active == name:
        _check_slots(model, record, "delete_adapter")
        _deactivate(model, record)
        _notify(record)
    del record.adapters[name]


def list_adapters(model: torch.nn.Module) -> List[AdapterInfo]:
    """The loaded adapters in load order, and which is active."""
    record = delta_slot.adapters_of(model) or _Record()
    return [AdapterInfo(n, n == record.active, a.format, a.path) for n, a in record.adapters.items()]


def base_e0s(model: torch.nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(the model's per-element energy table, the base's values in it), or None where
    no family knows the table; while an adapter's E0 shift is applied, the values from
    before it."""
    if family_of(model) is None:
        return None
    active = _active(model)
    try:
        table = _e0_whole(model, active.modal if active is not None else None)
    except (NotImplementedError, ValueError):  # a family, or a model, without one (or not at one fidelity)
        return None
    record = delta_slot.adapters_of(model)
    return table, record.e0_base if record is not None and record.e0_base is not None else table


def active_metadata(model: torch.nn.Module) -> Dict[str, str]:
    """What the active adapter adds to the model, as an adapter file's metadata: its
    per-element energy shift (the model's energies hold it) and the fidelity it was
    trained at; so an adapter saved from the model keeps them."""
    active = _active(model)
    if active is None:
        return {}
    shift = {"e0_shift_ev": json.dumps({str(z): v for z, v in active.e0_shift.items()})} if active.e0_shift else {}
    return {**shift, "modal": active.modal} if active.modal else shift


def no_deltas(model: torch.nn.Module, what: str) -> str:
    """Why ``what`` (merge, save_adapter) finds no deltas on ``model``: its adapters are
    loaded but none is active, or it has none."""
    record = delta_slot.adapters_of(model)
    if record is not None and record.adapters and record.active is None:
        loaded = ", ".join(repr(n) for n in record.adapters)
        return f"{what}: no adapter is active (loaded: {loaded}): activate one with set_adapter(model, name)"
    return f"{what}: the model has no deltas (call sparsekern.prepare or load_adapter first)"


def _active(model: torch.nn.Module) -> Optional[_Adapter]:
    record = delta_slot.adapters_of(model)
    return record.adapters[record.active] if record is not None and record.active else None


def adapter_calculator(model: torch.nn.Module, device: str = "cpu", modal: Optional[str] = None):
    """The model family's own ASE calculator on ``model`` itself: it computes with the
    active adapter, and forgets its cached results whenever the adapter changes. Each
    of its calculations runs with the model's parameters frozen, as they were after.
    A model of several fidelities (a SevenNet's modalities, a MACE's heads) computes at
    ``modal``, by default the one the adapter active now was trained at (a calculation
    after a swap to an adapter of another one is refused)."""
    family = family_of(model)
    if family is None:
        raise ValueError(f"adapter_calculator: sparsekern knows no ASE calculator for a {type(model).__name__}")
    active = _active(model)
    trained = active.modal if modal is None and active is not None else None
    calc = computing_at(family, model, modal or trained, "adapter_calculator: modal").model_calculator(model, device)
    calc.calculate = _frozen_during(model, _at_fidelity(model, trained, calc.calculate) if trained else calc.calculate)
    _record(model).listeners.append(weakref.WeakMethod(calc.reset))
    return calc


def _at_fidelity(model: torch.nn.Module, modal: str, calculate):
    """``calculate``, refused while the active adapter was trained at another fidelity
    than ``modal`` (the calculator's, from the adapter active when it was made)."""
    def run(*args, **kwargs):
        active = _active(model)
        if active is not None and active.modal not in (None, modal):
            raise ValueError(f"adapter_calculator: this calculator computes at modal {modal}, and the active adapter "
                             f"({active.path}) was trained at {active.modal}: make another, or pass modal=")
        return calculate(*args, **kwargs)

    return run


def _frozen_during(model: torch.nn.Module, calculate):
    """``calculate`` with ``model``'s parameters frozen for its time (SevenNet's calculator
    leaves a model trainable: its adapter's folds would be rebuilt at every call)."""
    def run(*args, **kwargs):
        with frozen(model):
            return calculate(*args, **kwargs)

    return run
