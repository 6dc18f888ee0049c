"""Which back ends exist on this machine and which one ``"auto"`` picks."""

from __future__ import annotations

import torch

from .layers import BACKENDS


def available(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":  # CUDA, or CPU tensors under TRITON_INTERPRET=1 (tests)
        from .kernels import triton

        return triton.available(device)
    if device.type != "cuda":
        return False
    if backend == "cuda":
        from .kernels import cuda

        return cuda.available()
    return False


def resolve(backend: str, layer, device: torch.device) -> str:
    """The back end a layer runs on. ``auto``: the fastest one the layer implements
    and the device supports; an explicit name must be available or it is an error."""
    if backend == "auto":  # GPU kernels only on GPUs (the interpreter is for tests)
        for name in ("cuda", "triton", "torch"):
            if name in layer.implemented_backends and (name == "torch" or device.type == "cuda") \
                    and available(name, device):
                return name
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if not available(backend, device):
        raise RuntimeError(f"backend {backend!r} is not available on {device} "
                           f"(torch is always available; cuda needs a GPU and the compiled extension; triton a GPU, or TRITON_INTERPRET=1 on CPU)")
    # A layer without a kernel for this back end runs its torch reference.
    return backend if backend in layer.implemented_backends else "torch"
