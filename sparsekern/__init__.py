"""sparsekern: fused kernels and sparse fine-tuning for E(3)-equivariant models."""

__version__ = "0.1.0"
