"""Gate activation (replaces ``e3nn.nn.Gate``, SevenNet's and NequIP's nonlinearity):
no weights, the same values in a fifth of the ops (``ops/torch/gate.py``)."""

from __future__ import annotations

import torch

from ..ops.descriptors import GateDesc
from .base import SparsekernLayer


class Gate(SparsekernLayer):
    op = "gate"

    def __init__(self, irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated) -> None:
        from e3nn.nn import Gate as E3nnGate

        super().__init__()
        self._init_from(E3nnGate(irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated))

    def _init_from(self, ref: torch.nn.Module) -> None:
        self._replaced = ref
        # e3nn's attributes, which models read
        self.irreps_in, self.irreps_out = ref.irreps_in, ref.irreps_out
        for name in ("irreps_scalars", "irreps_gates", "irreps_gated"):
            setattr(self, name, getattr(ref, name))
        self.desc = GateDesc.from_e3nn(ref)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self._check_features(features, self.desc.dim_in, "features", self.irreps_in)
        return self._run(features)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, backend={self.backend_name}"
