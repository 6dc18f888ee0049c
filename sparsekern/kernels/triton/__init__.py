"""Triton kernels (GPU; on CPU tensors under ``TRITON_INTERPRET=1``).

Every op is a multilinear form given by a sparse coefficient table; its derivative with
respect to one operand is a form of the same family with the operands permuted, so each
autograd Function's backward calls other autograd Functions of this package and
derivatives of any order are available (force training needs the second).
"""
from __future__ import annotations

import os

import torch


def available(device: torch.device | None = None) -> bool:
    """True when Triton imports and can run on ``device``: a CUDA device, or CPU tensors
    under the interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device is None or torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


from .conv import channelwise_tp, conv_fused  # noqa: E402
from .element_linear import element_linear, element_linear_layer  # noqa: E402
from .symmetric_contraction import symmetric_contraction  # noqa: E402

__all__ = ["available", "conv_fused", "channelwise_tp", "element_linear", "element_linear_layer",
           "symmetric_contraction"]
