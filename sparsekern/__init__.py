"""sparsekern: fused kernels and sparse fine-tuning for E(3)-equivariant models."""

from .patching import patch, patched_layers, unpatch

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "patched_layers"]
