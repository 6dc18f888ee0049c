"""Torch reference of e3nn's ``FullyConnectedNet`` (the radial MLPs), with the same
floating-point operations as e3nn's ``_Layer``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...delta_slot import effective
from ..descriptors import RadialDesc


def radial_mlp(desc: RadialDesc, x: torch.Tensor, weights: Sequence[torch.Tensor],
               deltas: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    for h_in, (act, var_in, var_out), w, d in zip(desc.hs, desc.layers, weights, deltas):
        w = effective(w, d)
        if act is not None:
            x = act(x @ (w / (h_in * var_in) ** 0.5)) * var_out ** 0.5
        else:
            x = x @ (w / (h_in * var_in / var_out) ** 0.5)
    return x
