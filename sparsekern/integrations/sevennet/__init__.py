"""SevenNet (sevenn): its layers are plain e3nn ones; patching adds only the fused
convolution (the interaction blocks' ``IrrepsConvolution``, see :mod:`.conv`). The
fine-tuning harness loads its models by name (``7net-0``) or checkpoint. sevenn is
imported only when a SevenNet model is met."""

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


register(PatchRule("sevennet", fuse_conv=_fuse_conv, unfuse_conv=_unfuse_conv))
register_family(SevenNetFamily())
