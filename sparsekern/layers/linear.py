"""Irrep linear (replaces ``e3nn.o3.Linear``): block-diagonal over irreps."""

from __future__ import annotations

from typing import List, Optional

import torch
from e3nn import o3

from .. import delta_slot
from ..ops import registry
from ..ops.descriptors import LinearDesc
from ..paths import Path
from .base import SparsekernLayer, on_its_device


class IrrepsLinear(SparsekernLayer):
    """y_i = sum over paths into i of path_weight * x_in W_path, e3nn's layout and
    normalisation. ``weight`` is flat in instruction order, as in ``o3.Linear``."""

    op = "linear"

    def __init__(self, irreps_in, irreps_out, instructions=None, biases=False, path_normalization="element"):
        super().__init__()
        self._init_from(o3.Linear(irreps_in, irreps_out, instructions=instructions, biases=biases,
                                  path_normalization=path_normalization))

    @classmethod
    def unsupported_reason(cls, module: o3.Linear) -> Optional[str]:
        if not module.internal_weights or not module.shared_weights:
            return "external or per-sample weights"
        if module.weight.dim() > 1 or module.bias.dim() > 1:  # (e3nn keeps f_in / f_out in their shapes only)
            return "f_in/f_out feature dimensions"
        if module.weight_numel == 0:  # (e3nn reads no input then, whatever its width: MACE's empty dipole gate)
            return "no path from its input: its output is constant"
        return None

    def _init_from(self, ref: o3.Linear) -> None:
        self.weight = ref.weight if isinstance(ref.weight, torch.nn.Parameter) else None
        self.bias = ref.bias if isinstance(ref.bias, torch.nn.Parameter) else None
        self._replaced = ref
        self.irreps_in = o3.Irreps(ref.irreps_in)
        self.irreps_out = o3.Irreps(ref.irreps_out)
        paths: List[Path] = []
        bias_paths = []
        offset = bias_offset = 0
        for ins in ref.instructions:
            if ins.i_in == -1:
                if self.irreps_out[ins.i_out].dim:  # (a block of multiplicity 0 has no bias: e3nn's is empty)
                    bias_paths.append((ins.i_out, bias_offset))
                    bias_offset += self.irreps_out[ins.i_out].dim
                continue
            mul_in, mul_out = self.irreps_in[ins.i_in].mul, self.irreps_out[ins.i_out].mul
            if mul_in * mul_out == 0:
                continue
            paths.append(Path(ins.i_in, ins.i_out, mul_in, mul_out, float(ins.path_weight), offset))
            offset += mul_in * mul_out
        self.weight_numel = offset
        self.desc = LinearDesc(self.irreps_in, self.irreps_out, tuple(paths), 1, "grc", offset, tuple(bias_paths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim_in = self.desc.blocks_in.dim  # not self.irreps_in.dim: see paths.Blocks
        self._check_features(x, dim_in, "x", self.irreps_in)
        if self.weight is not None:
            self._check_same(self.weight, x, "x")
        lead = x.shape[:-1]
        x = x.reshape(lead.numel(), dim_in)
        resolved = delta_slot.element_resolved(self, "weight")
        y = self._run(x, self.weight, self.bias, None if resolved else self._delta("weight"))
        if resolved is not None:  # y = x W0 + x dW[z]: the element linear's op on the delta alone
            delta, species, elements = resolved
            if species.shape != x.shape[:1]:
                raise ValueError(f"IrrepsLinear: an element-resolved delta needs one element per row of x: "
                                 f"{x.shape[0]} rows, {species.shape[0]} node species")
            backend = registry.resolve(self.requested_backend, "element_linear", x.device)
            with on_its_device(x):
                y = y + registry.implementation("element_linear", backend)(self.desc.per_element(elements), x,
                                                                           species, delta, None)
        return y.reshape(*lead, self.desc.blocks_out.dim)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, {self.weight_numel} weights, backend={self.backend_name}"
