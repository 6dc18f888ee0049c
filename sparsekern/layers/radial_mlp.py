"""Radial MLP (replaces ``e3nn.nn.FullyConnectedNet``), the network that turns edge
lengths into the per-edge weights of the convolution; its last layer holds one
column block per tensor-product path."""

from __future__ import annotations

import torch

from typing import List

from .base import SparsekernLayer, WeightGroup


class _Dense(torch.nn.Module):
    """One layer, same parameter name (``weight``, shape (h_in, h_out)) and the same
    floating-point operations as e3nn's ``_Layer``."""

    def __init__(self, weight: torch.nn.Parameter, act, var_in: float, var_out: float) -> None:
        super().__init__()
        self.weight = weight
        self.act = act
        self.h_in, self.h_out = weight.shape
        self.var_in, self.var_out = var_in, var_out

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = x @ (weight / (self.h_in * self.var_in) ** 0.5)
            return self.act(x) * self.var_out ** 0.5
        return x @ (weight / (self.h_in * self.var_in / self.var_out) ** 0.5)

    def extra_repr(self) -> str:
        return f"{self.h_in} -> {self.h_out}, act={self.act is not None}"


class RadialMLP(SparsekernLayer):
    def __init__(self, hs, act=None) -> None:
        from e3nn.nn import FullyConnectedNet

        super().__init__()
        self._init_from(FullyConnectedNet(hs, act))

    def _init_from(self, ref) -> None:
        self.hs = list(ref.hs)
        self.num_layers = len(self.hs) - 1
        for i in range(self.num_layers):
            layer = getattr(ref, f"layer{i}")
            setattr(self, f"layer{i}", _Dense(layer.weight, layer.act, layer.var_in, layer.var_out))
        self._replaced = ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hs[0]:
            raise ValueError(f"RadialMLP: input has last dimension {x.shape[-1]}, expected {self.hs[0]}")
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i}")(x, self.effective(f"layer{i}.weight"))
        return x

    def weight_groups(self) -> List[WeightGroup]:
        return [WeightGroup(f"layer{i}.weight", 0, (1, h_in, h_out), "grc", f"radial layer {i}", None, False)
                for i, (h_in, h_out) in enumerate(zip(self.hs, self.hs[1:]))]

    def to_e3nn(self):
        return self.to_replaced()

    def extra_repr(self) -> str:
        return f"{self.hs}, backend={self.backend}"
