"""A fine-tuned model's life: ``prepare`` (patch, freeze the base, attach a delta to
each path weight), ``to_fast``, and ``merge`` / ``unmerge`` for inference or export.
The deltas live in ``delta_slot``; nothing here knows how it stores them."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch

from .. import delta_slot
from ..integrations import computing_model, family_of
from ..layers.base import SparsekernLayer
from ..layers.linear import IrrepsLinear
from ..layers.radial_mlp import RadialMLP
from ..paths import WeightGroup
from ..patching import check_module, patch, patched_layers
from .config import SparseConfig
from .delta import Delta, FixedDelta, LoRADelta, ThresholdDelta, counted
from .density import settle, steer
from .methods import MODES
from .saliency import attach_salient, fisher_scores


def target_groups(layer: SparsekernLayer, config: Optional[SparseConfig] = None) -> Dict[str, List[WeightGroup]]:
    """The layer's path-weight groups, by parameter name (those a delta may change)."""
    if config is not None and not config.include_radial and isinstance(layer, RadialMLP):
        return {}
    by_param: Dict[str, List[WeightGroup]] = defaultdict(list)
    for g in layer.weight_groups():
        by_param[g.param].append(g)
    return dict(by_param)


class Target(NamedTuple):
    """A parameter a delta may change, and the delta's weight groups: the parameter's
    own, or (``elements`` > 0, element-resolved) one copy per element of a shared
    linear's, laid out as ``LinearDesc.per_element`` (``numel`` entries)."""

    name: str
    layer: SparsekernLayer
    param: str
    groups: List[WeightGroup]
    numel: int
    elements: int


def delta_targets(model: torch.nn.Module, config: SparseConfig) -> List[Target]:
    """Every parameter ``prepare`` (and a loaded adapter) gives a delta, with its shape."""
    n_el = _element_count(model) if config.element_resolved else 0
    targets = []
    for name, layer in patched_layers(model):
        for param, groups in target_groups(layer, config).items():
            # an irrep linear's weight is shared by all elements, but the one-hot embedding's
            # (input n_el x 0e) has a row per element already
            if n_el and isinstance(layer, IrrepsLinear) and str(layer.irreps_in) != f"{n_el}x0e":
                desc = layer.desc.per_element(n_el)
                targets.append(Target(name, layer, param, desc.weight_groups(), desc.weight_numel, n_el))
            else:
                targets.append(Target(name, layer, param, groups, layer.get_parameter(param).numel(), 0))
    return targets


def _element_count(model: torch.nn.Module) -> int:
    core, family = computing_model(model)
    if family is None:
        raise ValueError(f"element_resolved: each node's element comes from the model's family (MACE, SevenNet), "
                         f"and a {type(model).__name__} is none's")
    return len(family.element_index(core))


@delta_slot.mark_hook
def _give_species(model: torch.nn.Module, args) -> None:
    """Forward pre-hook: the element-resolved deltas learn each node's element."""
    if any(d.elements for *_, d in delta_slot.iter_deltas(model)):
        delta_slot.give_species(model, family_of(model).species(model, args[0]))


def _hook_species(model: torch.nn.Module) -> None:
    """Hook ``_give_species`` (once) on the module whose forward gets the graph."""
    core, _ = computing_model(model)
    if not any(h is _give_species for h in core._forward_pre_hooks.values()):
        core.register_forward_pre_hook(_give_species)


def attach_targets(model: torch.nn.Module, pairs: Iterable[Tuple[Target, Delta]]) -> None:
    """Attach each (target, its delta), and the species hook where one is element-resolved."""
    resolved = False
    for t, delta in pairs:
        delta_slot.attach(t.layer, t.param, delta)
        resolved |= bool(t.elements)
    if resolved:
        _hook_species(model)


def _new_delta(config: SparseConfig, t: Target, absent: List[int], generator: torch.Generator) -> Delta:
    base = t.layer.get_parameter(t.param)
    if config.mode == "lora":  # (B starts at zero: absent elements get no gradient and stay unchanged)
        return LoRADelta(t.groups, t.numel, base, config.lora_rank, config.lora_alpha, generator, t.elements)
    tile = (1, 1) if config.mode == "str" else config.tile
    delta = ThresholdDelta(t.groups, t.numel, base, tile, config.init_scale, generator, t.elements)
    with torch.no_grad():  # exactly zero: no gradient through the threshold, so they stay zero
        for g in t.groups if absent else ():
            if g.per_element:  # (element-resolved, and the model's own per-element weights)
                g.view(delta.v)[torch.tensor(absent, device=base.device)] = 0
                delta.pinned += len(absent) * g.shape[1] * g.shape[2]
    return delta


def absent_elements(model: torch.nn.Module, config: Optional[SparseConfig]) -> List[int]:
    """Element indices (the axis of per-element weights) of the model's elements outside
    ``config.elements``: their entries are pinned at zero."""
    if config is None or config.elements is None:
        return []
    core, family = computing_model(model)
    index = family.element_index(core)
    unknown = sorted(set(config.elements) - set(index))
    if unknown:
        raise ValueError(f"SparseConfig.elements: the model has no atomic numbers {unknown}")
    return sorted(i for z, i in index.items() if z not in config.elements)


def prepare(model: torch.nn.Module, config: Optional[SparseConfig] = None, backend: str = "auto",
            losses: Optional[Iterable[Callable[[], torch.Tensor]]] = None) -> torch.nn.Module:
    """Patch the model if needed, freeze every base parameter, attach a trainable delta
    to each path weight, and return the same model. ``losses`` (one callable per batch of
    training data, each returning the training loss) are what the "saliency" mode
    chooses its entries by."""
    check_module(model, "prepare")
    if config is not None and not isinstance(config, SparseConfig):
        raise TypeError(f"prepare takes a SparseConfig, got {type(config).__name__} {config!r:.60} "
                        f"(e.g. SparseConfig(density=0.03))")
    config = config or SparseConfig()
    if MODES[config.mode].needs_loss and losses is None:
        raise ValueError(f"prepare: mode {config.mode!r} chooses its entries from the training loss: "
                         f"pass losses=[a callable per batch returning its loss]")
    if not patched_layers(model):
        patch(model, backend=backend)
    if delta_slot.has_deltas(model):
        raise ValueError("prepare: the model already has sparse deltas (load_adapter or prepare was called)")
    for p in model.parameters():
        p.requires_grad_(False)
    targets, absent = delta_targets(model, config), absent_elements(model, config)
    if MODES[config.mode].needs_loss:
        plain = [(t.layer, t.param, t.groups) for t in targets]
        attach_salient(plain, fisher_scores(plain, losses), config.density, absent)
    else:
        generator = torch.Generator().manual_seed(config.seed)
        attach_targets(model, [(t, _new_delta(config, t, absent, generator)) for t in targets])
        _check_keeps_one(model, config)
    delta_slot.set_config(model, config)
    steer(model)
    return model


def _check_keeps_one(model: torch.nn.Module, config: SparseConfig) -> None:
    """A density that keeps no entry would train nothing and save the base as the result:
    refused, the deltas taken off again."""
    deltas = [d for *_, d in delta_slot.iter_deltas(model) if isinstance(d, ThresholdDelta)]
    n = counted(deltas)
    if deltas and round(config.density * n) == 0:
        for _, layer, param, _ in list(delta_slot.iter_deltas(model)):
            delta_slot.detach(layer, param)
        what = "tiles" if config.mode == "block" else "path weights"
        raise ValueError(f"density {config.density:g} keeps none of the model's {n} {what}: give at least "
                         f"{1 / n:.3g} (one of them)")


@torch.no_grad()
def to_fast(model: torch.nn.Module) -> torch.nn.Module:
    """Fast mode: keep only the entries that are active now and train just those."""
    for _, layer, param, delta in list(delta_slot.iter_deltas(model)):
        if isinstance(delta, ThresholdDelta):
            d = delta()
            index = torch.nonzero(d, as_tuple=True)[0]
            delta_slot.attach(layer, param, FixedDelta(delta.groups, delta.numel, index, d[index],
                                                       elements=delta.elements))
    return model


@torch.no_grad()
def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each delta into its base weight in place (for inference or export). The
    changed entries' old values are kept, so ``unmerge`` restores W0 bit for bit.
    Element-resolved deltas are refused (nothing is folded then): see ``unmergeable``;
    so is a model without deltas (none attached, or no adapter active), which would
    stay the base model without a word."""
    from .adapter_set import no_deltas  # (adapter_set builds on this module)

    if not delta_slot.has_deltas(model):
        raise ValueError(no_deltas(model, "merge"))
    reason = unmergeable(model)
    if reason:
        raise ValueError(f"merge: {reason}")
    settle(model)  # (after a user's optimizer step the thresholds are off the density's target)
    for _, layer, param, delta in delta_slot.iter_deltas(model):
        if delta.merged:
            continue
        base = layer.get_parameter(param)
        d = delta().view(-1)
        index = torch.nonzero(d, as_tuple=True)[0]
        flat = base.data.view(-1)
        delta.register_buffer("_unmerge_index", index, persistent=False)
        delta.register_buffer("_unmerge_values", flat[index].clone(), persistent=False)
        flat[index] = flat[index] + d[index]  # the same addition the forward pass does
        delta.merged = True
    return model


@torch.no_grad()
def unmerge(model: torch.nn.Module) -> torch.nn.Module:
    for _, layer, param, delta in delta_slot.iter_deltas(model):
        if not delta.merged:
            continue
        layer.get_parameter(param).data.view(-1)[delta._unmerge_index] = delta._unmerge_values
        delta.merged = False
    return model


def unmergeable(model: torch.nn.Module) -> Optional[str]:
    """Why ``merge`` cannot fold the model's deltas into its weights (None: it can). An
    element-resolved delta changes a shared weight differently for each element, which
    the family's own layer (one weight for all) cannot hold; converting the layer to an
    element-indexed one would give a model the family's loader and calculator do not
    know, so the deltas stay an adapter."""
    for name, _, param, delta in delta_slot.iter_deltas(model):
        if delta.elements:
            return (f"{name}.{param} has an element-resolved delta (one change per element), which its weight, "
                    "shared by all elements, cannot hold: keep the deltas attached or saved as an adapter")
    return None
