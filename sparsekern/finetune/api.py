"""prepare / stats / to_fast / merge / unmerge: sparsity-promoting fine-tuning on a
(patched) model. Base weights stay frozen; deltas attach to sparsekern layers."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..layers.base import SparsekernLayer, WeightGroup
from ..layers.radial_mlp import RadialMLP
from ..patching import patch, patched_layers
from .config import SparseConfig
from .delta import Delta, FixedDelta, LoRADelta, ThresholdDelta


def _key(param: str) -> str:
    return param.replace(".", "__")  # ModuleDict keys cannot hold dots


def target_groups(layer: SparsekernLayer, config: Optional[SparseConfig] = None) -> Dict[str, List[WeightGroup]]:
    """The layer's path-weight groups, by parameter name."""
    if config is not None and not config.include_radial and isinstance(layer, RadialMLP):
        return {}
    by_param: Dict[str, List[WeightGroup]] = defaultdict(list)
    for g in layer.weight_groups():
        by_param[g.param].append(g)
    return dict(by_param)


def iter_deltas(model: torch.nn.Module) -> Iterator[Tuple[str, SparsekernLayer, str, Delta]]:
    """(layer name, layer, parameter name, delta) for every attached delta."""
    for name, layer in patched_layers(model):
        deltas = layer._modules.get("deltas")
        if deltas is None:
            continue
        for key, delta in deltas.items():
            yield name, layer, key.replace("__", "."), delta


def prepare(model: torch.nn.Module, config: Optional[SparseConfig] = None, backend: str = "auto") -> torch.nn.Module:
    """Patch the model if needed, freeze every base parameter, attach a trainable delta
    to each path weight, and return the same model."""
    config = config or SparseConfig()
    if not patched_layers(model):
        patch(model, backend=backend)
    if any(True for _ in iter_deltas(model)):
        raise ValueError("prepare: the model already has sparse deltas (load_adapter or prepare was called)")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    for _, layer in patched_layers(model):
        deltas = torch.nn.ModuleDict()
        for param, groups in target_groups(layer, config).items():
            base = layer.get_parameter(param)
            if config.mode == "lora":
                deltas[_key(param)] = LoRADelta(groups, base.numel(), base, config.lora_rank, config.lora_alpha, gen)
            else:
                tile = (1, 1) if config.mode == "str" else config.tile
                deltas[_key(param)] = ThresholdDelta(groups, base.numel(), base, tile, config.init_scale, gen)
        if len(deltas):
            layer.deltas = deltas
    model.sparsekern_config = config
    if config.mode != "lora":
        calibrate_density(model)
        model.register_forward_pre_hook(_steer_density)
    return model


def _steer_density(model: torch.nn.Module, args) -> None:
    """Forward pre-hook: in training, recalibrate the global threshold shift so the
    density stays on target while the per-layer thresholds are learned."""
    if model.training and torch.is_grad_enabled():
        calibrate_density(model)


@torch.no_grad()
def calibrate_density(model: torch.nn.Module, density: Optional[float] = None) -> None:
    """Set every ThresholdDelta's tau_shift so that the fraction ``density`` (default:
    the config's) of all targeted weights changes."""
    density = density if density is not None else model.sparsekern_config.density
    deltas = [d for *_, d in iter_deltas(model) if isinstance(d, ThresholdDelta) and not d.merged]
    if not deltas:
        return
    scores = torch.cat([d.scores().float() for d in deltas])
    keep = int(round(density * scores.numel()))
    if keep >= scores.numel():
        shift = scores.min() - 1.0
    else:
        shift = torch.kthvalue(scores.cpu(), scores.numel() - keep).values  # `keep` scores lie above
    for d in deltas:
        d.tau_shift.fill_(float(shift))


@torch.no_grad()
def to_fast(model: torch.nn.Module) -> torch.nn.Module:
    """Fast mode: keep only the entries that are active now and train just those."""
    for _, layer, param, delta in list(iter_deltas(model)):
        if isinstance(delta, ThresholdDelta):
            d = delta()
            index = torch.nonzero(d, as_tuple=True)[0]
            layer.deltas[_key(param)] = FixedDelta(delta.groups, delta.numel, index, d[index])
    return model


@torch.no_grad()
def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each delta into its base weight in place (for inference or export). The
    changed entries' old values are kept, so ``unmerge`` restores W0 bit for bit."""
    for _, layer, param, delta in iter_deltas(model):
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
    for _, layer, param, delta in iter_deltas(model):
        if not delta.merged:
            continue
        layer.get_parameter(param).data.view(-1)[delta._unmerge_index] = delta._unmerge_values
        delta.merged = False
    return model


def element_labels(model: torch.nn.Module, count: int) -> List[str]:
    """Chemical symbols of the element axis of per-element weights, where known."""
    from ase.data import chemical_symbols

    numbers = getattr(model, "atomic_numbers", None)
    if numbers is not None and len(numbers) == count:
        return [chemical_symbols[int(z)] for z in numbers]
    if count == len(chemical_symbols) - 1:  # SevenNet-style: one-hot over atomic numbers 1..
        return chemical_symbols[1:]
    return [f"element {i}" for i in range(count)]


def _changed_mask(delta: Optional[Delta]) -> Optional[torch.Tensor]:
    """Flat boolean mask of the entries a delta changes (also once merged)."""
    if delta is None:
        return None
    if delta.merged:
        mask = torch.zeros(delta.numel, dtype=torch.bool, device=delta._unmerge_index.device)
        mask[delta._unmerge_index] = True
        return mask
    return delta().view(-1) != 0


def count_changes(entries: Iterable[Tuple[str, Sequence[WeightGroup], Optional[torch.Tensor]]],
                  labels_for: Callable[[int], List[str]]) -> dict:
    """The counting behind ``stats`` (and ``report``, which reads the groups from an
    adapter): ``entries`` holds (layer name, the weight groups of one parameter, flat
    changed mask or None); ``labels_for(G)`` names the G elements of per-element groups."""
    layers: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    by_path: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    by_l: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    by_element: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    by_element_l: Dict[str, Dict[str, List[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for name, groups, flat in entries:
        seen: Dict[str, int] = defaultdict(int)
        for g in groups:
            nz = g.view(flat) if flat is not None else None
            n_changed = int(nz.sum()) if nz is not None else 0
            key = "radial" if g.l is None else str(g.l)
            seen[g.label] += 1  # e.g. several 0e inputs of one linear: number the repeats
            path = f"{name}.{g.param} {g.label}" + (f" ({seen[g.label]})" if seen[g.label] > 1 else "")
            for counter in (layers[name], by_path[path], by_l[key]):
                counter[0] += g.numel
                counter[1] += n_changed
            if g.per_element:
                per = nz.sum((1, 2)).tolist() if nz is not None else [0] * g.shape[0]
                for label, c in zip(labels_for(g.shape[0]), per):
                    for counter in (by_element[label], by_element_l[label][key]):
                        counter[0] += g.shape[1] * g.shape[2]
                        counter[1] += int(c)
    by_layer = {k: v for k, v in layers.items() if v[0]}
    total = sum(t for t, _ in by_layer.values())
    changed = sum(c for _, c in by_layer.values())

    def table(d):
        return {k: {"total": t, "changed": c, "density": c / t if t else 0.0} for k, (t, c) in d.items()}

    return {
        "total_params": total,
        "changed_params": changed,
        "density": changed / total if total else 0.0,
        "by_layer": table(by_layer),
        "by_path": table(by_path),
        "by_l": table(by_l),
        "by_element": table(by_element),
        "by_element_l": {e: table(d) for e, d in by_element_l.items()},
    }


@torch.no_grad()
def stats(model: torch.nn.Module) -> dict:
    """How many path weights the deltas change: totals and breakdowns by layer, by
    path, by irrep order l of the path, by element, and by element and l."""
    entries = []
    for name, layer in patched_layers(model):
        deltas = layer._modules.get("deltas")
        for param, groups in target_groups(layer).items():
            delta = deltas._modules.get(_key(param)) if deltas is not None else None
            entries.append((name, groups, _changed_mask(delta)))
    counts = count_changes(entries, lambda count: element_labels(model, count))
    return {
        **counts,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_params": sum(p.numel() for n, p in model.named_parameters() if ".deltas." not in f".{n}"),
    }
