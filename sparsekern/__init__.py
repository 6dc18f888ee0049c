"""sparsekern: fused kernels and sparse fine-tuning for E(3)-equivariant models."""

import torch

# e3nn 0.4.4 (pinned by mace-torch) torch.loads its constants, which hold slices,
# at import; torch >= 2.6 refuses that unless slice is an allowed global.
with torch.serialization.safe_globals([slice]):
    import e3nn.o3  # noqa: F401

from .patching import patch, patched_layers, unpatch  # noqa: E402

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "patched_layers"]
