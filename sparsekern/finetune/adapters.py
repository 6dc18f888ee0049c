"""Adapters: the active delta entries of a fine-tuned model and a fingerprint of its
base, in one safetensors file (kilobytes for a few % of changed weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import __version__
from ..files import atomic_write
from ..layers.base import WeightGroup
from ..patching import patch, patched_layers
from .api import _key, element_labels, iter_deltas, target_groups
from .delta import FixedDelta

FORMAT = "sparsekern-adapter"
# version 2 adds "groups" (each parameter's weight groups) and "element_labels" (the
# names along the element axis of per-element groups, by its length); version 1 files
# still load, and ``report`` then needs their base model.
VERSION = "2"


def group_to_dict(g: WeightGroup) -> dict:
    return {"param": g.param, "offset": g.offset, "shape": list(g.shape), "layout": g.layout,
            "label": g.label, "l": g.l, "per_element": g.per_element}


def group_from_dict(d: dict) -> WeightGroup:
    return WeightGroup(str(d["param"]), int(d["offset"]), tuple(int(n) for n in d["shape"]), str(d["layout"]),
                       str(d["label"]), None if d["l"] is None else int(d["l"]), bool(d["per_element"]))


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the names, shapes and float64 values of the base path weights (the
    same for a model patched or not, float32 or moved to float64)."""
    h = hashlib.sha256()
    params = []
    for name, layer in patched_layers(model):
        for param in target_groups(layer):
            params.append((f"{name}.{param}", layer.get_parameter(param)))
    for name, p in sorted(params, key=lambda np_: np_[0]):
        if any(d.merged for *_, d in iter_deltas(model)):
            raise ValueError("fingerprint: the model has merged deltas; unmerge it first")
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_adapter(model: torch.nn.Module, path, extra_metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the nonzero delta entries and the base's fingerprint, atomically. The
    metadata also describes each parameter's weight groups and names the elements, so
    ``sparsekern report`` can break the update down without the base model."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: Dict[str, torch.Tensor] = {}
    groups: Dict[str, List[dict]] = {}
    elements: Dict[str, List[str]] = {}
    with torch.no_grad():
        for layer_name, _, param, delta in iter_deltas(model):
            if delta.merged:
                raise ValueError("save_adapter: unmerge the model first (merged deltas are folded into W0)")
            d = delta().view(-1)
            index = torch.nonzero(d, as_tuple=True)[0]
            tensors[f"{layer_name}.{param}.index"] = index.to(torch.int32).cpu().contiguous()
            tensors[f"{layer_name}.{param}.values"] = d[index].detach().cpu().contiguous()
            groups[f"{layer_name}.{param}"] = [group_to_dict(g) for g in delta.groups]
            for g in delta.groups:
                if g.per_element:
                    elements[str(g.shape[0])] = element_labels(model, g.shape[0])
    if not tensors:
        raise ValueError("save_adapter: the model has no sparse deltas (call sparsekern.prepare first)")
    config = getattr(model, "sparsekern_config", None)
    metadata = {"format": FORMAT, "version": VERSION, "sparsekern": __version__, "fingerprint": fingerprint(model),
                "config": json.dumps(config.to_dict() if config is not None else None),
                "groups": json.dumps(groups), "element_labels": json.dumps(elements)}
    clash = set(metadata) & set(extra_metadata or {})
    if clash:
        raise ValueError(f"save_adapter: extra_metadata may not set the adapter's own keys {sorted(clash)}")
    metadata.update(extra_metadata or {})
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_adapter(path, fmt: str = FORMAT, what: str = "sparsekern adapter"):
    """(tensors, metadata) of an adapter file of format ``fmt``; a clear error for
    anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable {what} (corrupt or another format): {exc}") from exc
    if metadata.get("format") != fmt:
        raise ValueError(f"{path} is not a {what} (format {metadata.get('format')!r})")
    return tensors, metadata


def load_adapter(model: torch.nn.Module, path, trainable: bool = False) -> torch.nn.Module:
    """Attach an adapter's deltas to a base model (patched here if needed). Refuses an
    adapter made for another base model."""
    tensors, metadata = read_adapter(path)
    if not patched_layers(model):
        patch(model)
    if any(True for _ in iter_deltas(model)):
        raise ValueError("load_adapter: the model already has deltas; load adapters into a clean base model")
    expected, found = metadata.get("fingerprint"), fingerprint(model)
    if expected != found:
        raise ValueError(f"adapter {path} was made for a different base model "
                         f"(its base fingerprint {expected[:12] if expected else None}..., this model's {found[:12]}...)")
    layers = dict(patched_layers(model))
    entries: Dict[str, List[str]] = {}
    for key in tensors:
        stem, kind = key.rsplit(".", 1)
        entries.setdefault(stem, []).append(kind)
    for stem in sorted(entries):
        layer_name, param = _split(stem, layers)
        layer = layers[layer_name]
        groups = target_groups(layer).get(param)
        index, values = tensors.get(f"{stem}.index"), tensors.get(f"{stem}.values")
        base = layer.get_parameter(param)
        if groups is None or index is None or values is None or index.shape != values.shape \
                or (index.numel() and int(index.max()) >= base.numel()):
            raise ValueError(f"adapter {path}: entry {stem!r} does not fit this model")
        if layer._modules.get("deltas") is None:
            layer.deltas = torch.nn.ModuleDict()
        layer.deltas[_key(param)] = FixedDelta(groups, base.numel(), index.to(base.device),
                                               values.to(device=base.device, dtype=base.dtype), trainable)
    return model


def _split(stem: str, layers) -> tuple:
    """'interactions.0.skip_tp.weight' -> ('interactions.0.skip_tp', 'weight'), the
    longest layer name that prefixes it."""
    for name in sorted(layers, key=len, reverse=True):
        if stem.startswith(name + "."):
            return name, stem[len(name) + 1:]
    raise ValueError(f"adapter entry {stem!r} names no sparsekern layer of this model")
