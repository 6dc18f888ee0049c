"""The delta slot: the one module that knows where sparsekern keeps what it attaches to
a model. A layer's deltas live in ``layer.deltas`` (a ModuleDict keyed by the parameter
name they change, dots mangled); the model's fine-tuning settings in
``model.sparsekern_config``; the named adapters loaded on it (``finetune.adapter_set``)
in ``model.sparsekern_adapters``; its hooks carry a mark so :func:`strip` finds them.
Layers pass an attached delta to the ops as a flat tensor (:func:`active`); kernels that
skip inactive blocks read it through :func:`active_blocks`. An element-resolved delta of
a shared weight (one change per element, :func:`element_resolved`) also needs each
node's element: a hook on the model gives them to it before every forward
(:func:`give_species`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:
    from .paths import WeightGroup

SLOT = "deltas"
CONFIG = "sparsekern_config"
ADAPTERS = "sparsekern_adapters"
_HOOK_MARK = "_sparsekern_hook"


class Delta(torch.nn.Module):
    """A trainable change of one parameter: ``forward()`` gives its flat dense delta
    (``numel`` entries, zeros outside ``groups``). ``merged``: folded into the base
    weight (``finetune.merge``), so the layers no longer add it. ``elements`` > 0: an
    element-resolved delta of a shared weight, one change per element (``numel`` is
    ``elements`` times the parameter's, in the element-indexed layout of
    ``LinearDesc.per_element``); ``species``: each node's element index in the current
    forward (a plain attribute, set by :func:`give_species`)."""

    elements: int = 0  # (class defaults: deltas pickled before these attributes existed)
    species: Optional[torch.Tensor] = None

    def __init__(self, groups: Sequence["WeightGroup"], numel: int, elements: int = 0) -> None:
        super().__init__()
        self.groups: List["WeightGroup"] = list(groups)
        self.numel = numel
        self.elements = elements
        self.species: Optional[torch.Tensor] = None
        self.merged = False

    def extra_repr(self) -> str:
        resolved = f", elements={self.elements}" if self.elements else ""
        return f"numel={self.numel}, groups={len(self.groups)}{resolved}, merged={self.merged}"


def _key(param: str) -> str:
    return param.replace(".", "__")  # ModuleDict keys cannot hold dots


def _param(key: str) -> str:
    return key.replace("__", ".")


def _slot(module: torch.nn.Module) -> Optional[torch.nn.ModuleDict]:
    modules = module._modules  # a plain dict, except in TorchScript modules (no deltas there)
    return modules.get(SLOT) if isinstance(modules, dict) else None


def attach(layer: torch.nn.Module, param: str, delta: Delta) -> None:
    """Attach (or replace) the delta of ``layer``'s parameter ``param``."""
    if _slot(layer) is None:
        setattr(layer, SLOT, torch.nn.ModuleDict())
    _slot(layer)[_key(param)] = delta


def get(layer: torch.nn.Module, param: str) -> Optional[Delta]:
    deltas = _slot(layer)
    return deltas._modules.get(_key(param)) if deltas is not None else None


def detach(layer: torch.nn.Module, param: Optional[str] = None) -> None:
    """Remove the delta of ``param``, or every delta of the layer."""
    deltas = _slot(layer)
    if deltas is None:
        return
    if param is None:
        del layer._modules[SLOT]
    else:
        del deltas[_key(param)]


def layer_deltas(layer: torch.nn.Module) -> Iterator[Tuple[str, Delta]]:
    """(parameter name, delta) for each delta attached to ``layer``."""
    deltas = _slot(layer)
    for key, delta in (deltas.items() if deltas is not None else ()):
        yield _param(key), delta


def iter_deltas(model: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module, str, Delta]]:
    """(layer name, layer, parameter name, delta) for every delta attached in ``model``."""
    for name, module in model.named_modules():
        if _slot(module) is not None:
            for param, delta in layer_deltas(module):
                yield name, module, param, delta


def has_deltas(model: torch.nn.Module) -> bool:
    return any(True for _ in iter_deltas(model))


def state_prefix(layer_name: str, param: str) -> str:
    """The state-dict prefix of the delta of ``layer_name``'s ``param``."""
    return f"{layer_name}.{SLOT}.{_key(param)}."


def is_delta_parameter(name: str) -> bool:
    """Whether a (model- or layer-level) parameter name belongs to a delta."""
    return f".{SLOT}." in f".{name}"


def active(layer: torch.nn.Module, param: str) -> Optional[Delta]:
    """The delta whose value (``delta()``) the forward pass must add to ``param``, or None."""
    delta = get(layer, param)
    if delta is not None and delta.elements:  # a layer that cannot apply it must not drop it silently
        raise TypeError(f"{type(layer).__name__} cannot apply an element-resolved delta to {param!r}")
    return None if delta is None or delta.merged else delta


def element_resolved(layer: torch.nn.Module, param: str) -> Optional[Tuple[torch.Tensor, torch.Tensor, int]]:
    """(flat per-element delta, each node's element index, number of elements) of
    ``param``'s element-resolved delta, or None where it has none."""
    delta = get(layer, param)
    if delta is None or not delta.elements:
        return None
    if delta.species is None:
        raise RuntimeError(f"{type(layer).__name__}: an element-resolved delta, but no node species for this "
                           "forward (the model's forward pre-hook gives them: call the model, or give_species)")
    return delta(), delta.species, delta.elements


def give_species(model: torch.nn.Module, species: torch.Tensor) -> None:
    """Give every element-resolved delta in ``model`` the element index of each node of
    the coming forward."""
    for *_, delta in iter_deltas(model):
        if delta.elements:
            delta.species = species


def active_blocks(flat: torch.Tensor, groups: Sequence["WeightGroup"], T: int,
                  index: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block view of a flat delta that block-sparse kernels read: (block_slot,
    block_values) for all groups at once. block_values (n_tiles, T, T) holds every tile
    of the delta (a differentiable copy, by one gather), group after group, each group's
    (G, ceil(R/T), ceil(C/T)) tiles row-major; block_slot (n_tiles,) int32 is -1 for a
    tile without a nonzero, else its own row. No host sync: the active tiles are marked,
    not counted, so kernels skip the inactive ones on the device. A delta being trained
    has every tile active: a tile of zeros may still have a gradient (LoRA's B and a
    fresh fast mode delta start at zero), and skipping it would freeze it. ``index``:
    :func:`tile_index` of the groups on ``flat``'s device, kept by the caller (a layer's
    descriptor); built here if None."""
    index, inverse = index if index is not None else (t.to(flat.device) for t in tile_index(groups, T, flat.numel()))
    values = _Gather.apply(flat, index, inverse).view(-1, T, T)
    rows = torch.arange(values.shape[0], dtype=torch.int32, device=flat.device)
    if flat.requires_grad:
        return rows, values
    return torch.where(values.detach().ne(0).flatten(1).any(-1), rows, -1), values


def tile_index(groups: Sequence["WeightGroup"], T: int, numel: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(index, inverse) for :func:`active_blocks`, on the CPU: the flat delta's entry at each tile
    position (``numel``, one past the end, in the padding), and each entry's tile position
    (past the end: in no group)."""
    flat = torch.arange(numel + 1)
    tiles = []
    for g in groups:
        n_el, r, c = g.shape
        nu, nv = -(-r // T), -(-c // T)
        padded = torch.nn.functional.pad(g.view(flat), (0, nv * T - c, 0, nu * T - r), value=numel)
        tiles.append(padded.reshape(n_el, nu, T, nv, T).transpose(2, 3).reshape(-1))
    index = torch.cat(tiles) if tiles else flat[:0]
    inverse = torch.full((numel + 1,), index.numel(), dtype=torch.int64)
    inverse[index] = torch.arange(index.numel())
    return index, inverse[:numel]


class _Gather(torch.autograd.Function):
    """``x[index]``, an index past the end reading 0, where each entry of ``x`` is read at
    most once (``inverse`` says where; past the end: nowhere), so the gradient is the
    gather by ``inverse``: two gathers, no scatter, to any order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.index, ctx.inverse = index, inverse  # constants: kept without the saved-tensor checks
        return torch.nn.functional.pad(x, (0, 1)).index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Gather.apply(grad, ctx.inverse, ctx.index), None, None


def set_config(model: torch.nn.Module, config) -> None:
    setattr(model, CONFIG, config)


def config_of(model: torch.nn.Module):
    return getattr(model, CONFIG, None)


def adapters_of(model: torch.nn.Module):
    """The record of the named adapters loaded on ``model`` (None: none). A plain
    attribute, not a submodule: inactive adapters stay out of ``parameters()`` and the
    state dict."""
    return model.__dict__.get(ADAPTERS)


def set_adapters(model: torch.nn.Module, record) -> None:
    model.__dict__[ADAPTERS] = record


def mark_hook(fn):
    """Mark a hook function as sparsekern's, so :func:`strip` removes it."""
    setattr(fn, _HOOK_MARK, True)
    return fn


def strip(model: torch.nn.Module) -> None:
    """Remove sparsekern's hooks (from ``model`` and its modules) and settings (from
    ``model``; the layers' deltas go with the layers: ``patching.release``)."""
    for module in model.modules():  # (a wrapper's hooks may sit on the model it holds)
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, _HOOK_MARK, False):
                del module._forward_pre_hooks[key]
    model.__dict__.pop(CONFIG, None)
    model.__dict__.pop(ADAPTERS, None)


def effective(weight: Optional[torch.Tensor], delta: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """W0 + dW for a flat ``delta`` (from :func:`active`), or W0 where there is none."""
    return weight if delta is None else weight + delta.view_as(weight)
