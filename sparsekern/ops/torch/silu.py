"""SiLU and its derivatives in few ops (the radial MLPs' and the gates' activation):
aten's ``silu_backward`` for g silu'(z) where autograd need not record it, the second
derivative written out, and :func:`silu` with both as its backward passes."""

from __future__ import annotations

import torch


def silu_grad(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """g silu'(z): one op, or where autograd records it (a third derivative, which
    aten's ``silu_backward`` has no formula for) s (1 + z (1 - s)) g, s = sigmoid(z)."""
    if not torch.is_grad_enabled():
        return torch.ops.aten.silu_backward(g, z)
    s = torch.sigmoid(z)
    return g * s * (1 + z * (1 - s))


def silu_second(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """g silu''(z) = g (s - s s) (z + 2 - 2 z s), s = sigmoid(z)."""
    s = torch.sigmoid(z)
    return g * torch.addcmul(s, s, s, value=-1) * torch.addcmul(z + 2, z, s, value=-2)


def silu(z: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.silu`` whose backward is one op and whose double backward
    (force training) is :func:`silu_second`, where autograd's decomposes the derivative
    into about a dozen recorded ops."""
    return _SiLU.apply(z)


class _SiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return torch.nn.functional.silu(z)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return _SiLUGrad.apply(g, z)


class _SiLUGrad(torch.autograd.Function):
    """(g, z) -> g silu'(z); its backward: (G silu'(z), G g silu''(z))."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, z)
        return silu_grad(g, z)

    @staticmethod
    def backward(ctx, G: torch.Tensor):
        g, z = ctx.saved_tensors
        return silu_grad(G, z), silu_second(G * g, z)
