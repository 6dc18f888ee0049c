"""A fine-tuned model's life: ``prepare`` (patch, freeze the base, attach a delta to
each path weight), ``to_fast``, and ``merge`` / ``unmerge`` for inference or export.
The deltas live in ``delta_slot``; nothing here knows how it stores them."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .. import delta_slot
from ..layers.base import SparsekernLayer
from ..layers.radial_mlp import RadialMLP
from ..paths import WeightGroup
from ..patching import patch, patched_layers
from .config import SparseConfig
from .delta import Delta, FixedDelta, LoRADelta, ThresholdDelta
from .density import steer
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


def _new_delta(config: SparseConfig, groups: List[WeightGroup], base: torch.Tensor,
               generator: torch.Generator) -> Delta:
    if config.mode == "lora":
        return LoRADelta(groups, base.numel(), base, config.lora_rank, config.lora_alpha, generator)
    tile = (1, 1) if config.mode == "str" else config.tile
    return ThresholdDelta(groups, base.numel(), base, tile, config.init_scale, generator)


def prepare(model: torch.nn.Module, config: Optional[SparseConfig] = None, backend: str = "auto",
            losses: Optional[Iterable[Callable[[], torch.Tensor]]] = None) -> torch.nn.Module:
    """Patch the model if needed, freeze every base parameter, attach a trainable delta
    to each path weight, and return the same model. ``losses`` (one callable per batch of
    training data, each returning the training loss) are what the "saliency" mode
    chooses its entries by."""
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
    targets = [(layer, param, groups) for _, layer in patched_layers(model)
               for param, groups in target_groups(layer, config).items()]
    if MODES[config.mode].needs_loss:
        attach_salient(targets, fisher_scores(targets, losses), config.density)
    else:
        generator = torch.Generator().manual_seed(config.seed)
        for layer, param, groups in targets:
            delta_slot.attach(layer, param, _new_delta(config, groups, layer.get_parameter(param), generator))
    delta_slot.set_config(model, config)
    steer(model)
    return model


@torch.no_grad()
def to_fast(model: torch.nn.Module) -> torch.nn.Module:
    """Fast mode: keep only the entries that are active now and train just those."""
    for _, layer, param, delta in list(delta_slot.iter_deltas(model)):
        if isinstance(delta, ThresholdDelta):
            d = delta()
            index = torch.nonzero(d, as_tuple=True)[0]
            delta_slot.attach(layer, param, FixedDelta(delta.groups, delta.numel, index, d[index]))
    return model


@torch.no_grad()
def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each delta into its base weight in place (for inference or export). The
    changed entries' old values are kept, so ``unmerge`` restores W0 bit for bit."""
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
