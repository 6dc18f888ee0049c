"""MACE's symmetric contraction (the product basis), both parametrisations
(``use_reduced_cg`` on and off: they differ only in the U tensors and weight shapes).

For the element z of each node, out[c, m] = sum_nu sum_k W_nu[z, k, c] U_nu[m, i_1..i_nu, k]
prod_j x[c, i_j] (the ops: ``sparsekern.ops.{torch,triton}.symmetric_contraction``)."""

from __future__ import annotations

from typing import List

import torch
from e3nn import o3

from ..ops.descriptors import ContractionDesc
from ..paths import WeightGroup
from .base import SparsekernLayer


class SymmetricContraction(SparsekernLayer):
    """Drop-in for ``mace.modules.symmetric_contraction.SymmetricContraction``:
    ``forward(x, node_attrs)`` with x of shape (nodes, channels, sum of irrep dims).
    Holds MACE's own ``contractions`` modules (weights ``weights_max``, ``weights.i``
    and the U buffers), so names, shapes and the state dict are unchanged."""

    op = "symmetric_contraction"

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module):
        if not getattr(module, "internal_weights", True):
            return "external weights"
        return None

    def _init_from(self, ref) -> None:
        self.irreps_in = o3.Irreps(ref.irreps_in)
        self.irreps_out = o3.Irreps(ref.irreps_out)
        self.contractions = ref.contractions
        self.num_features = self.irreps_in.count((0, 1))
        self.num_elements = self.contractions[0].weights_max.shape[0]
        self._replaced = ref
        u = tuple(tuple(con.U_tensors(nu).detach().to("cpu", torch.float64) for nu in range(1, con.correlation + 1))
                  for con in self.contractions)
        self.desc = ContractionDesc(self.irreps_in, self.irreps_out, self.num_features,
                                    sum(ir.dim for _, ir in self.irreps_in), self.num_elements, u)

    @staticmethod
    def weight_names(index: int, contraction) -> List[str]:
        """Names of [W_1, ..., W_correlation], each (n_elements, n_coupling_nu, channels)."""
        prefix = f"contractions.{index}."
        lower = [f"{prefix}weights.{j}" for j in range(len(contraction.weights))]
        return list(reversed(lower)) + [f"{prefix}weights_max"]

    def _names(self) -> List[List[str]]:
        return [self.weight_names(j, con) for j, con in enumerate(self.contractions)]

    def weight_groups(self) -> List[WeightGroup]:
        groups = []
        for names, ir_out in zip(self._names(), self.irreps_out):
            for nu, name in enumerate(names, start=1):
                w = self.get_parameter(name)
                if w.numel() and type(w).__name__ != "EmptyParam":  # MACE's zeroed paths hold no weights
                    groups.append(WeightGroup(name, 0, tuple(w.shape), "grc", f"{ir_out.ir} nu={nu}",
                                              ir_out.ir.l, True))
        return groups

    def forward(self, x: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        coupling_dim = self.desc.coupling_dim
        if x.dim() != 3 or x.shape[1] != self.num_features or x.shape[2] != coupling_dim:
            raise ValueError(
                f"SymmetricContraction: x must have shape (nodes, {self.num_features}, {coupling_dim}) "
                f"for irreps {self.irreps_in}, got {tuple(x.shape)}")
        self._check_same(self.contractions[0].weights_max, x, "x")
        if node_attrs.shape[0] != x.shape[0]:
            raise ValueError(f"SymmetricContraction: {x.shape[0]} nodes in x but {node_attrs.shape[0]} in node_attrs")
        names = self._names()
        weights = [[self._weight(name) for name in names_j] for names_j in names]
        deltas = [[self._delta(name) for name in names_j] for names_j in names]
        used = [t for row in weights + deltas for t in row if t is not None]
        return self._by_element(lambda x, species: self._run(x, species, weights, deltas), x, node_attrs,
                                self.num_elements, used)

    def extra_repr(self) -> str:
        return (f"{self.irreps_in} -> {self.irreps_out}, {self.num_elements} elements, "
                f"backend={self.backend_name}")
