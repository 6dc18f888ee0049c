"""SevenNet (sevenn): its layers are plain e3nn ones; patching adds the fused
convolution (the interaction blocks' ``IrrepsConvolution``, see :mod:`.conv`) and a
type table and readout without host reads (:mod:`.sync_free`). The fine-tuning harness
loads its models by name (``7net-0``) or checkpoint. sevenn is imported only when a
SevenNet model is met."""

from __future__ import annotations

import torch

from ...patching import PatchRule, register
from ..base import register_family
from .family import SevenNetFamily


def _fuse_conv(parent: torch.nn.Module, name: str) -> bool:
    if name != "convolution" or type(parent).__module__ != "sevenn.nn.convolution":
        return False
    from .conv import fuse

    return fuse(parent)


def _unfuse_conv(parent: torch.nn.Module) -> None:
    if type(parent).__module__ == f"{__name__}.conv":
        from .conv import unfuse

        unfuse(parent)


def _is_sevennet(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("sevenn.") for m in model.modules())


def _sync_free(model: torch.nn.Module) -> None:
    if _is_sevennet(model):
        from .sync_free import swap

        swap(model)


def _unswap(model: torch.nn.Module) -> None:
    if _is_sevennet(model):
        from .sync_free import unswap

        unswap(model)


register(PatchRule("sevennet", before_patch=_sync_free, fuse_conv=_fuse_conv, unfuse_conv=_unfuse_conv,
                   after_unpatch=_unswap))
register_family(SevenNetFamily())
