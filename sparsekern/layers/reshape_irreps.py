"""MACE's ``reshape_irreps`` (flat node features to (nodes, channels, irrep components)
before the symmetric contraction): no weights, one gather where MACE's forward issues a
slice, a reshape per irrep block and a concatenation (``ops/torch/reshape_irreps.py``)."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.descriptors import ReshapeDesc
from .base import SparsekernLayer


def _ir_mul(module: torch.nn.Module) -> bool:
    """MACE's own test of the layout its forward reshapes to."""
    config = getattr(module, "cueq_config", None)
    return config is not None and config.layout_str != "mul_ir"


class ReshapeIrreps(SparsekernLayer):
    op = "reshape_irreps"

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module) -> Optional[str]:
        if len(set(module.muls)) > 1:
            return f"multiplicities differ ({module.irreps}): MACE's concatenation needs one"
        return None

    def _init_from(self, ref: torch.nn.Module) -> None:
        self._replaced = ref
        self.irreps, self.dims, self.muls = ref.irreps, list(ref.dims), list(ref.muls)  # MACE's attributes
        self.desc = ReshapeDesc(self.muls[0] if self.muls else 0, tuple(self.dims), _ir_mul(ref))

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check_features(tensor, sum(m * d for m, d in zip(self.muls, self.dims)), "tensor", self.irreps)
        if tensor.dim() != 2:
            raise ValueError(f"ReshapeIrreps: expected features of shape (nodes, {self.irreps.dim}), "
                             f"got {tuple(tensor.shape)}")
        return self._run(tensor)

    def extra_repr(self) -> str:
        return f"{self.irreps}, {'ir_mul' if self.desc.ir_mul else 'mul_ir'}, backend={self.backend_name}"
