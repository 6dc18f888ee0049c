"""``patch(model)`` swaps the e3nn layers of a model for sparsekern layers in place;
``unpatch(model)`` puts plain modules back; ``release(model)`` also strips what
fine-tuning attached. The new layers share the old ones' Parameter objects, so
parameter names, shapes, values and ``requires_grad`` are unchanged and an optimizer
built before patching keeps working. Model families add their own rules
(:class:`PatchRule`, registered by ``sparsekern.integrations``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import delta_slot
from .layers import (ChannelwiseConv, ChannelwiseTP, ElementLinear, Gate, IrrepsLinear, RadialMLP,
                     SparsekernLayer, SphericalHarmonics)
from .ops import registry


@dataclass(frozen=True)
class PatchRule:
    """What a model family adds to patching: more (module class, layer class) pairs; a
    step before patching (e.g. turning a converted model back into e3nn layers) and one
    after unpatching (undoing what the first changed, if anything); where a
    ``conv_tp`` becomes the fused convolution, with its undoing; and modules to leave whole,
    layers inside them included (the family's own code reads them: the reason, or None)."""

    name: str
    converters: Callable[[], List[Tuple[type, type]]] = lambda: []
    before_patch: Callable[[torch.nn.Module], None] = lambda model: None
    fuse_conv: Callable[[torch.nn.Module, str], bool] = lambda parent, name: False
    unfuse_conv: Callable[[torch.nn.Module], None] = lambda parent: None
    after_unpatch: Callable[[torch.nn.Module], None] = lambda model: None
    left_whole: Callable[[torch.nn.Module], Optional[str]] = lambda module: None


_RULES: List[PatchRule] = []


def register(rule: PatchRule) -> None:
    _RULES[:] = [r for r in _RULES if r.name != rule.name] + [rule]


def _rules() -> List[PatchRule]:
    importlib.import_module(f"{__package__}.integrations")  # the families register their rules
    return _RULES


@dataclass
class PatchReport:
    replaced: List[Tuple[str, str, str, str]] = field(default_factory=list)  # name, old, new, backend
    left: List[Tuple[str, str, str]] = field(default_factory=list)  # name, class, reason

    def __str__(self) -> str:
        lines = [f"sparsekern: replaced {len(self.replaced)} layers, left {len(self.left)}"]
        lines += [f"  replaced {n}: {o} -> {c} [{b}]" for n, o, c, b in self.replaced]
        lines += [f"  left     {n}: {c} ({r})" for n, c, r in self.left]
        return "\n".join(lines)


def _converters(rules: List[PatchRule]) -> List[Tuple[type, type]]:
    """(exact class replaced, the sparsekern class that replaces it)."""
    from e3nn import nn as e3nn_nn
    from e3nn import o3

    table = [(o3.Linear, IrrepsLinear), (o3.FullyConnectedTensorProduct, ElementLinear),
             (o3.TensorProduct, ChannelwiseTP), (e3nn_nn.FullyConnectedNet, RadialMLP),
             (o3.SphericalHarmonics, SphericalHarmonics), (e3nn_nn.Gate, Gate)]
    return table + [pair for rule in rules for pair in rule.converters()]


def check_module(model, what: str) -> None:
    """A one-line TypeError where ``model`` is not a torch module (a path, a config)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{what} takes a torch.nn.Module, got {type(model).__name__} {model!r:.60}")


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _children(parent: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module]]:
    """Every (name, child), a child held under several names once for each
    (``named_children`` gives it once: the other names would keep the e3nn module)."""
    return ((name, child) for name, child in parent._modules.items() if child is not None)


def patch(model: torch.nn.Module, backend: str = "auto", verbose: bool = False) -> torch.nn.Module:
    """Replace known layers in place and return the same model object (patched layers
    already there move to ``backend``)."""
    check_module(model, "patch")
    registry.check(backend, _model_device(model))
    rules = _rules()
    fresh = not any(isinstance(m, SparsekernLayer) for m in model.modules())
    for rule in rules:
        rule.before_patch(model)
    device = _model_device(model)
    table = _converters(rules)
    report = PatchReport()
    replaced: Dict[int, Tuple[str, SparsekernLayer]] = {}  # a module used under several names: one layer
    swapped: List[Tuple[torch.nn.Module, str, torch.nn.Module]] = []  # (parent, name, what was there)

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        for name, child in list(_children(parent)):
            full = f"{prefix}{name}"
            whole = next(filter(None, (rule.left_whole(child) for rule in rules)), None)
            if whole:
                report.left.append((full, type(child).__name__, whole))
                continue
            swapped.append((parent, name, child))
            if id(child) in replaced:
                first, new = replaced[id(child)]
                setattr(parent, name, new)
                report.replaced.append((full, type(child).__name__, f"{type(new).__name__} (= {first})",
                                        new.backend_name))
                continue
            if isinstance(child, SparsekernLayer):
                child.use_backend(backend, device)
                continue
            entry = next((e for e in table if type(child) is e[0]), None)
            if entry is not None:
                reason = entry[1].unsupported_reason(child)
                if reason is None:
                    new = _replace(parent, name, child, entry[1], rules, (backend, device))
                    replaced[id(child)] = (full, new)
                    report.replaced.append((full, entry[0].__name__, type(new).__name__, new.backend_name))
                    continue
                report.left.append((full, type(child).__name__, reason))
            before = type(child)
            visit(child, full + ".")
            if entry is None and any(True for _ in child.parameters(recurse=False)):
                # a block whose class a rule swapped (SevenNet's convolution) runs fused
                why = "no sparsekern equivalent" if type(child) is before else "its own parameters kept, its product fused"
                report.left.append((full, before.__name__, why))

    if any(type(model) is cls for cls, _ in table):  # (patch swaps submodules: the model object stays)
        report.left.append(("(the model)", type(model).__name__, _A_LAYER))
    try:
        visit(model, "")
    except Exception:
        _put_back(swapped, rules, model if fresh else None)
        raise
    global last_report
    last_report = report
    if verbose:
        print(report)
    return model


_A_LAYER = "a layer itself, not a model holding it: patch a module that contains it (torch.nn.Sequential(layer))"


def _replace(parent: torch.nn.Module, name: str, child: torch.nn.Module, new_cls: type, rules: List[PatchRule],
             on: Tuple[str, torch.device]) -> SparsekernLayer:
    """``child``, ``parent``'s ``name``, replaced by a ``new_cls`` on back end and device ``on``."""
    fused = new_cls is ChannelwiseTP and any(rule.fuse_conv(parent, name) for rule in rules)
    try:
        new = (ChannelwiseConv if fused else new_cls).from_e3nn(child).use_backend(*on)
    except Exception:  # (the parent fused, its conv not: unfused again)
        if fused:
            for rule in rules:
                rule.unfuse_conv(parent)
        raise
    new.fused_conv = fused
    setattr(parent, name, new)
    return new


def _put_back(swapped: List[Tuple[torch.nn.Module, str, torch.nn.Module]], rules: List[PatchRule],
              fresh: Optional[torch.nn.Module]) -> None:
    """The model as it was before a patch that failed part way, not half patched; the
    ``fresh`` model (none of whose layers was patched before) also without what the rules'
    ``before_patch`` changed."""
    for parent, name, child in reversed(swapped):
        if getattr(parent, name) is not child:
            if getattr(getattr(parent, name), "fused_conv", False):
                for rule in rules:
                    rule.unfuse_conv(parent)
            setattr(parent, name, child)
    for rule in rules if fresh is not None else ():
        rule.after_unpatch(fresh)


last_report: Optional[PatchReport] = None


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Turn sparsekern layers back into the plain modules they replaced (carrying the
    current parameters) and return the same model object."""
    check_module(model, "unpatch")
    if isinstance(model, SparsekernLayer):
        raise ValueError("unpatch takes the model that contains sparsekern layers, not a layer")
    for name, layer, _, delta in delta_slot.iter_deltas(model):
        if not delta.merged:
            raise ValueError(f"unpatch: {name} holds sparse deltas that are not merged; call "
                             "sparsekern.merge(model) first (or save_adapter), or they would be lost")

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(_children(parent)):
            if isinstance(child, SparsekernLayer):
                setattr(parent, name, child.to_replaced())
                if getattr(child, "fused_conv", False):
                    for rule in rules:
                        rule.unfuse_conv(parent)
            else:
                visit(child)

    rules = _rules()
    visit(model)
    for rule in rules:
        rule.after_unpatch(model)
    return model


def release(model: torch.nn.Module) -> torch.nn.Module:
    """Strip everything sparsekern put on ``model``: its layers (their merged deltas with
    them: ``finetune.merge`` first), its hooks and settings. The parameters are trainable
    again, as in the family's own files. Returns the same, plain, model."""
    unpatch(model)
    delta_slot.strip(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def patched_layers(model: torch.nn.Module) -> List[Tuple[str, SparsekernLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparsekernLayer)]
