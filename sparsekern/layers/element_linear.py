"""Element-indexed linear: replaces ``FullyConnectedTensorProduct(x, one_hot(Z))``
(MACE's ``skip_tp``, SevenNet's self-connection) by one linear map per element,
instead of e3nn's dense product over the one-hot (n_elements times the FLOPs)."""

from __future__ import annotations

from math import sqrt
from typing import List, Optional

import torch
from e3nn import o3

from ..ops.descriptors import LinearDesc
from ..paths import Path
from .base import SparsekernLayer


class ElementLinear(SparsekernLayer):
    """y[n] = sum_paths scale * x[n] W_path[:, z_n, :] for one-hot node attributes.

    ``weight`` keeps e3nn's flat layout, each path a (mul_in, n_elements, mul_out)
    block, so the layer is a drop-in replacement of the tensor product."""

    op = "element_linear"

    def __init__(self, irreps_in, num_elements: int, irreps_out):
        super().__init__()
        self._init_from(o3.FullyConnectedTensorProduct(irreps_in, f"{num_elements}x0e", irreps_out))

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module) -> Optional[str]:
        irreps2 = o3.Irreps(module.irreps_in2)
        if len(irreps2) != 1 or irreps2[0].ir != o3.Irrep("0e"):
            return f"second operand {irreps2} is not one block of scalars (node attributes)"
        if module.weight_numel and (not module.internal_weights or not module.shared_weights):
            return "external or per-sample weights"
        if any(ins.connection_mode != "uvw" or not ins.has_weight for ins in module.instructions):
            return "instructions other than weighted 'uvw'"
        return None

    def _init_from(self, ref) -> None:
        self.irreps_in = o3.Irreps(ref.irreps_in1)
        self.irreps_out = o3.Irreps(ref.irreps_out)
        self.num_elements = o3.Irreps(ref.irreps_in2)[0].mul
        paths: List[Path] = []
        offset = 0
        for ins in ref.instructions:
            mul_in, mul_out = self.irreps_in[ins.i_in1].mul, self.irreps_out[ins.i_out].mul
            numel = mul_in * self.num_elements * mul_out
            if numel:
                # e3nn's path weight times the (l, 0, l) Clebsch-Gordan value 1/sqrt(2l+1)
                d = self.irreps_out[ins.i_out].ir.dim
                paths.append(Path(ins.i_in1, ins.i_out, mul_in, mul_out, ins.path_weight / sqrt(d), offset))
            offset += numel
        self.weight_numel = offset
        self.weight = ref.weight
        self._replaced = ref
        self.desc = LinearDesc(self.irreps_in, self.irreps_out, tuple(paths), self.num_elements, "rgc", offset)

    def forward(self, x: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        self._check_features(x, self.desc.blocks_in.dim, "x", self.irreps_in)  # see paths.Blocks
        self._check_same(self.weight, x, "x")
        if node_attrs.device != x.device:
            raise ValueError(f"ElementLinear: node_attrs on {node_attrs.device}, x on {x.device}")
        if node_attrs.shape[0] != x.shape[0]:
            raise ValueError(f"ElementLinear: {x.shape[0]} nodes in x but {node_attrs.shape[0]} in node_attrs")
        weight, delta = self._weight("weight"), self._delta("weight")  # (as this call has them: functional_call)
        return self._by_element(lambda x, species: self._run(x, species, weight, delta), x, node_attrs,
                                self.num_elements, [t for t in (weight, delta) if t is not None])

    def extra_repr(self) -> str:
        return (f"{self.irreps_in} x {self.num_elements} elements -> {self.irreps_out}, "
                f"{self.weight_numel} weights, backend={self.backend_name}")
