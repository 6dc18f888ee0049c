"""Torch reference of MACE's ``reshape_irreps``: one column permutation (a gather whose
gradient is the gather by the inverse permutation: no zero-filled slices, no scatter,
to any order) and a view, where MACE slices, reshapes and concatenates each block."""

from __future__ import annotations

import torch

from ..descriptors import ReshapeDesc


def reshape_irreps(desc: ReshapeDesc, x: torch.Tensor) -> torch.Tensor:
    perm = desc.const("perm", x, lambda: desc.perm)
    if perm is not None:
        inverse = desc.const("inverse", x, lambda: torch.argsort(desc.perm))
        x = _Permute.apply(x, perm, inverse)
    return x.reshape(x.shape[0], *desc.shape)


class _Permute(torch.autograd.Function):
    """x[:, perm]; its gradient g[:, inverse]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.perm, ctx.inverse = perm, inverse  # constants: kept without the saved-tensor checks
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Permute.apply(grad, ctx.inverse, ctx.perm), None, None
