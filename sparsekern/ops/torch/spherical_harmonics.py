"""Torch reference of e3nn's ``SphericalHarmonics`` (l <= 3): the monomials of the
vector times a constant matrix, about twenty ops where e3nn's TorchScript graph issues
about a hundred (each a launch on a GPU, a dispatch on the host), with autograd's
derivatives of all orders."""

from __future__ import annotations

import torch

from ..descriptors import SHDesc


def spherical_harmonics(desc: SHDesc, x: torch.Tensor) -> torch.Tensor:
    u = torch.nn.functional.normalize(x, dim=-1) if desc.normalize else x  # e3nn's: 0 for a zero vector
    flat = u.reshape(-1, 3)
    c = desc.const("coefficients", x, lambda: desc.coefficients)
    out = torch.cat(SHDesc.monomials(flat, desc.lmax), dim=1) @ c
    return out.reshape(*x.shape[:-1], c.shape[1])
