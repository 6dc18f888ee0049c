"""MACE (mace-torch): models converted to cuequivariance are turned back into e3nn
layers before patching (and into cuequivariance again after unpatching), MACE's
symmetric contraction, polynomial cutoff and ``reshape_irreps`` get sparsekern's, and
the interaction blocks' ``conv_tp`` becomes the fused convolution (MACE's
``conv_fusion`` contract). mace-torch is imported only when a MACE model is met."""

from __future__ import annotations

from typing import Optional

import torch

from ...patching import PatchRule, register
from ..base import register_family
from . import cueq
from .family import MaceFamily


def _converters():
    try:
        from mace.modules.irreps_tools import reshape_irreps
        from mace.modules.radial import PolynomialCutoff as MaceCutoff
        from mace.modules.symmetric_contraction import SymmetricContraction as MaceSC
    except ImportError:
        return []
    from ...layers import PolynomialCutoff, ReshapeIrreps, SymmetricContraction

    return [(MaceSC, SymmetricContraction), (MaceCutoff, PolynomialCutoff), (reshape_irreps, ReshapeIrreps)]




def _fuse_conv(parent: torch.nn.Module, name: str) -> bool:
    """MACE interaction blocks call ``conv_tp(node_feats, edge_attrs, tp_weights,
    edge_index)`` when they have a ``conv_fusion`` attribute: give them the fused conv."""
    if (name == "conv_tp" and type(parent).__module__.startswith("mace.")
            and hasattr(parent, "conv_tp_weights") and not hasattr(parent, "conv_fusion")):
        parent.conv_fusion = "sparsekern"
        return True
    return False


def _unfuse_conv(parent: torch.nn.Module) -> None:
    if getattr(parent, "conv_fusion", None) == "sparsekern":
        del parent.conv_fusion


def _left_whole(module: torch.nn.Module) -> Optional[str]:
    """MACE's LoRA wrappers read the e3nn layers they hold (``.instructions``, ``.weight``)."""
    if type(module).__module__ == "mace.modules.lora":
        return "MACE's LoRA wrapper reads the e3nn layer inside: merge it first (mace.modules.lora.merge_lora_weights)"
    return None


register(PatchRule("mace", _converters, cueq.patch_in_e3nn, _fuse_conv, _unfuse_conv, cueq.back_to_cueq,
                   _left_whole))
register_family(MaceFamily())
