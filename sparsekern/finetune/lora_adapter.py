"""LoRA adapters: the factors A_g, B_g of every path block, not the dense product (whose
nonzeros are all of the path weights), with the base fingerprint, in one safetensors
file. Loading rebuilds the LoRA deltas on a fresh base and copies the factors in."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..files import atomic_write
from ..patching import patch, patched_layers
from .adapters import fingerprint, read_adapter
from .api import iter_deltas, prepare
from .config import SparseConfig
from .delta import LoRADelta

FORMAT = "sparsekern-lora-adapter"


def save_lora_adapter(model: torch.nn.Module, path) -> Path:
    from safetensors.torch import save_file

    tensors = {}
    for layer_name, _, param, delta in iter_deltas(model):
        if not isinstance(delta, LoRADelta):
            raise ValueError("save_lora_adapter: the model's deltas are not LoRA deltas (use save_adapter)")
        if delta.merged:
            raise ValueError("save_lora_adapter: unmerge the model first")
        for i, (a, b) in enumerate(zip(delta.a, delta.b)):
            tensors[f"{layer_name}.{param}.{i}.a"] = a.detach().cpu().contiguous()
            tensors[f"{layer_name}.{param}.{i}.b"] = b.detach().cpu().contiguous()
    if not tensors:
        raise ValueError("save_lora_adapter: the model has no LoRA deltas")
    metadata = {"format": FORMAT, "version": "1", "sparsekern": __version__, "fingerprint": fingerprint(model),
                "config": json.dumps(model.sparsekern_config.to_dict())}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_lora_adapter(model: torch.nn.Module, path) -> torch.nn.Module:
    """Attach a LoRA adapter to a clean base model (refuses another base)."""
    tensors, metadata = read_adapter(path, FORMAT, "sparsekern LoRA adapter")
    config = SparseConfig(**{k: tuple(v) if k == "tile" and isinstance(v, list) else v
                             for k, v in json.loads(metadata["config"]).items()})
    if not patched_layers(model):
        patch(model)
    if fingerprint(model) != metadata.get("fingerprint"):
        raise ValueError(f"LoRA adapter {path} was made for a different base model")
    prepare(model, config)
    expected = set(tensors)
    with torch.no_grad():
        for layer_name, _, param, delta in iter_deltas(model):
            for i, (a, b) in enumerate(zip(delta.a, delta.b)):
                for name, p in (("a", a), ("b", b)):
                    key = f"{layer_name}.{param}.{i}.{name}"
                    if key not in tensors or tensors[key].shape != p.shape:
                        raise ValueError(f"LoRA adapter {path}: entry {key!r} missing or does not fit this model")
                    p.copy_(tensors[key])
                    expected.discard(key)
    if expected:
        raise ValueError(f"LoRA adapter {path}: entries for layers this model lacks: {sorted(expected)[:3]}")
    return model
