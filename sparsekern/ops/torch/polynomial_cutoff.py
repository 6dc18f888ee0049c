"""Torch reference of MACE's ``PolynomialCutoff``: the envelope as one power and a
Horner polynomial (:class:`CutoffDesc`), zero from r_max on; autograd's derivatives of
every order."""

from __future__ import annotations

import torch

from ..descriptors import CutoffDesc


def polynomial_cutoff(desc: CutoffDesc, x: torch.Tensor, r_max: torch.Tensor) -> torch.Tensor:
    a, b, c = desc.horner
    u = x / r_max
    return (1.0 + u.pow(desc.p) * (a + u * (b + c * u))) * (x < r_max)
