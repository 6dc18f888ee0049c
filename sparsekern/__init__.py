"""sparsekern: fused kernels and sparse fine-tuning for E(3)-equivariant models."""

import torch

# e3nn 0.4.4 (pinned by mace-torch) torch.loads its constants, which hold slices,
# at import; torch >= 2.6 refuses that unless slice is an allowed global.
with torch.serialization.safe_globals([slice]):
    import e3nn.o3  # noqa: F401

__version__ = "0.1.0"

from .patching import patch, patched_layers, unpatch  # noqa: E402
from .finetune import (SparseConfig, load_adapter, merge, prepare, save_adapter, stats,  # noqa: E402
                       to_fast, unmerge)

__all__ = ["patch", "unpatch", "patched_layers", "SparseConfig", "prepare", "stats", "save_adapter",
           "load_adapter", "merge", "unmerge", "to_fast"]
