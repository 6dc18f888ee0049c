"""sparsekern: fused kernels and sparse fine-tuning for E(3)-equivariant models.

The public names load on first use, so importing an op or a layer does not import the
fine-tuning code (nor the model integrations it needs)."""

import importlib

import torch

# e3nn 0.4.4 (pinned by mace-torch) torch.loads its constants, which hold slices,
# at import; torch >= 2.6 refuses that unless slice is an allowed global.
with torch.serialization.safe_globals([slice]):
    import e3nn.o3  # noqa: F401

__version__ = "0.1.0"

_EXPORTS = {
    "patch": "patching", "unpatch": "patching", "patched_layers": "patching", "release": "patching",
    "SparseConfig": "finetune", "prepare": "finetune", "stats": "finetune", "save_adapter": "finetune",
    "load_adapter": "finetune", "merge": "finetune", "unmerge": "finetune", "to_fast": "finetune",
    "set_adapter": "finetune", "disable_adapter": "finetune", "delete_adapter": "finetune",
    "list_adapters": "finetune", "adapter_calculator": "finetune", "precompile": "ops.triton.precompile",
    "GraphedMACE": "integrations.mace.graphed", "GraphedSevenNet": "integrations.sevennet.graphed",
    "keep_freed_memory": "host_memory",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsekern' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
