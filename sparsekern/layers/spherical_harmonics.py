"""Spherical harmonics of the edge vectors (replaces e3nn's ``SphericalHarmonics``,
l <= 3): no weights, the same values in far fewer ops."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.descriptors import SHDesc
from .base import SparsekernLayer


class SphericalHarmonics(SparsekernLayer):
    op = "spherical_harmonics"

    def __init__(self, irreps_out, normalize: bool, normalization: str = "integral") -> None:
        from e3nn import o3

        super().__init__()
        ref = o3.SphericalHarmonics(irreps_out, normalize, normalization)
        reason = self.unsupported_reason(ref)
        if reason:
            raise ValueError(f"SphericalHarmonics: {reason}")
        self._init_from(ref)

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module) -> Optional[str]:
        if max(module._ls_list) > SHDesc.MAX_L:
            return f"l = {max(module._ls_list)} > {SHDesc.MAX_L}"
        return None

    def _init_from(self, ref) -> None:
        # e3nn's attributes, which MACE's tools read (extract_config_mace_model: _lmax)
        for name in ("irreps_in", "irreps_out", "normalize", "normalization", "_ls_list", "_lmax"):
            setattr(self, name, getattr(ref, name))
        self._replaced = ref
        self.desc = SHDesc.from_e3nn(ref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point() or x.shape[-1:] != (3,):
            raise ValueError(f"SphericalHarmonics: expected floating vectors of shape (..., 3), got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        return self._run(x)

    def extra_repr(self) -> str:
        return f"{self.irreps_out}, normalize={self.desc.normalize}, backend={self.backend_name}"
