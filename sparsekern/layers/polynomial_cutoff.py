"""MACE's polynomial cutoff envelope (replaces ``mace.modules.radial.PolynomialCutoff``):
no weights, the same values in fewer ops (10 against 26 forward; 55 against 108 with
the two derivatives force training takes)."""

from __future__ import annotations

import torch

from ..ops.descriptors import CutoffDesc
from .base import SparsekernLayer


class PolynomialCutoff(SparsekernLayer):
    """Keeps MACE's buffers ``p`` and ``r_max`` (state dicts and MACE's tools read them);
    the degree is read from ``p`` when built and whenever a state dict is loaded."""

    op = "polynomial_cutoff"

    def _init_from(self, ref: torch.nn.Module) -> None:
        self._replaced = ref
        self.register_buffer("p", ref.p)
        self.register_buffer("r_max", ref.r_max)
        self._read_degree()

    def _read_degree(self) -> None:
        self.desc = CutoffDesc(int(self.p))  # once, not per call: a host sync on a GPU

    def _load_from_state_dict(self, *args) -> None:
        super()._load_from_state_dict(*args)
        self._read_degree()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"PolynomialCutoff: expected floating distances, got "
                            f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
        return self._run(x, self.r_max)

    def to_replaced(self) -> torch.nn.Module:
        """MACE's module, holding this layer's buffers (their device and dtype)."""
        for name, buf in self.named_buffers(recurse=False):
            self._replaced.register_buffer(name, buf)
        return self._replaced

    def extra_repr(self) -> str:
        return f"p={self.desc.p}, backend={self.backend_name}"
