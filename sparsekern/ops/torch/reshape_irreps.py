"""Torch reference of MACE's ``reshape_irreps``: one column permutation (a gather whose
gradient is the gather by the inverse permutation: no zero-filled slices, no scatter,
to any order; ``take.py``) and a view, where MACE slices, reshapes and concatenates each block."""

from __future__ import annotations

import torch

from ..descriptors import ReshapeDesc
from .take import permute


def reshape_irreps(desc: ReshapeDesc, x: torch.Tensor) -> torch.Tensor:
    perm = desc.const("perm", x, lambda: desc.perm)
    if perm is not None:
        inverse = desc.const("inverse", x, lambda: torch.argsort(desc.perm))
        x = permute(x, 1, perm, inverse)
    return x.reshape(x.shape[0], *desc.shape)
