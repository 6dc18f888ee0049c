"""Radial MLP (replaces ``e3nn.nn.FullyConnectedNet``), the network that turns edge
lengths into the per-edge weights of the convolution; its last layer holds one
column block per tensor-product path."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.descriptors import RadialDesc
from .base import SparsekernLayer


class _Dense(torch.nn.Module):
    """Holds one layer's ``weight`` (shape (h_in, h_out)) under e3nn's parameter name."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} -> {self.weight.shape[1]}"


class RadialMLP(SparsekernLayer):
    op = "radial_mlp"

    def __init__(self, hs, act=None) -> None:
        from e3nn.nn import FullyConnectedNet

        super().__init__()
        self._init_from(FullyConnectedNet(hs, act))

    @classmethod
    def unsupported_reason(cls, module) -> Optional[str]:
        from e3nn.nn._fc import _Layer

        odd = [type(layer).__name__ for layer in module.children() if type(layer) is not _Layer]
        return f"layers that are not e3nn's ({', '.join(odd)})" if odd else None

    def _init_from(self, ref) -> None:
        self.hs = list(ref.hs)
        self.num_layers = len(self.hs) - 1
        layers = []
        for i in range(self.num_layers):
            layer = getattr(ref, f"layer{i}")
            setattr(self, f"layer{i}", _Dense(layer.weight))
            layers.append((layer.act, layer.var_in, layer.var_out))
        self._replaced = ref
        self.desc = RadialDesc(tuple(self.hs), tuple(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hs[0]:
            raise ValueError(f"RadialMLP: input has last dimension {x.shape[-1]}, expected {self.hs[0]}")
        names = [f"layer{i}.weight" for i in range(self.num_layers)]
        return self._run(x, [self._weight(n) for n in names], [self._delta(n) for n in names])

    def extra_repr(self) -> str:
        return f"{self.hs}, backend={self.backend_name}"
