"""MACE's symmetric contraction (the product basis), both parametrisations
(``use_reduced_cg`` on and off: they differ only in the U tensors and weight shapes).

For the element z of each node, out[c, m] = sum_nu sum_k W_nu[z, k, c] U_nu[m, i_1..i_nu, k]
prod_j x[c, i_j]. Per element present we fold W into U once (A_nu[c, m, i...]) and
evaluate the polynomial in Horner form, channel by channel as a batched product:
nodes of one element share A, so the cost is one GEMM chain per element instead
of contracting U with per-node weights."""

from __future__ import annotations

from typing import List

import torch
from e3nn import o3

from .base import SparsekernLayer, WeightGroup
from .element_linear import ElementLinear


class SymmetricContraction(SparsekernLayer):
    """Drop-in for ``mace.modules.symmetric_contraction.SymmetricContraction``:
    ``forward(x, node_attrs)`` with x of shape (nodes, channels, sum of irrep dims).
    Holds MACE's own ``contractions`` modules (weights ``weights_max``, ``weights.i``
    and the U buffers), so names, shapes and the state dict are unchanged."""

    implemented_backends = ("torch", "triton")

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
        self.coupling_dim = sum(ir.dim for _, ir in self.irreps_in)
        first = self.contractions[0]
        self.num_elements = first.weights_max.shape[0]
        widest = max(u.numel() // u.shape[-1] for con in self.contractions for u in self.u_by_degree(con))
        self._chunk = max(1, 2 ** 24 // (self.num_features * widest // self.coupling_dim))
        self._replaced = ref

    @staticmethod
    def weight_names(index: int, contraction) -> List[str]:
        """Names of [W_1, ..., W_correlation], each (n_elements, n_coupling_nu, channels)."""
        prefix = f"contractions.{index}."
        lower = [f"{prefix}weights.{j}" for j in range(len(contraction.weights))]
        return list(reversed(lower)) + [f"{prefix}weights_max"]

    def weight_groups(self) -> List[WeightGroup]:
        groups = []
        for index, (contraction, ir_out) in enumerate(zip(self.contractions, self.irreps_out)):
            for nu, name in enumerate(self.weight_names(index, contraction), start=1):
                w = self.get_parameter(name)
                if w.numel() and type(w).__name__ != "EmptyParam":  # MACE's zeroed paths hold no weights
                    groups.append(WeightGroup(name, 0, tuple(w.shape), "grc", f"{ir_out.ir} nu={nu}",
                                              ir_out.ir.l, True))
        return groups

    @staticmethod
    def u_by_degree(contraction) -> List[torch.Tensor]:
        return [contraction.U_tensors(nu) for nu in range(1, contraction.correlation + 1)]

    def forward(self, x: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.num_features or x.shape[2] != self.coupling_dim:
            raise ValueError(
                f"SymmetricContraction: x must have shape (nodes, {self.num_features}, {self.coupling_dim}) "
                f"for irreps {self.irreps_in}, got {tuple(x.shape)}")
        self._check_same(self.contractions[0].weights_max, x, "x")
        if node_attrs.shape[0] != x.shape[0]:
            raise ValueError(f"SymmetricContraction: {x.shape[0]} nodes in x but {node_attrs.shape[0]} in node_attrs")
        species = ElementLinear.species(self, node_attrs)
        if self.backend == "triton":
            from ..kernels.triton import symmetric_contraction
            return symmetric_contraction(self, x, species)
        n = x.shape[0]
        order = torch.argsort(species, stable=True)
        counts = torch.bincount(species, minlength=self.num_elements).tolist()
        # (c, i, nodes), contiguous: channels are the batch of every product below
        xs = x.index_select(0, order).permute(1, 2, 0).contiguous()
        # chunks bound the (c, m d^(nu-1), nodes) temporaries; split (not slicing) keeps
        # the backward to one concatenation instead of one zero-filled tensor per chunk
        elements = [z for z, cnt in enumerate(counts) for _ in range(0, cnt, self._chunk)]
        sizes = [min(self._chunk, cnt - lo) for cnt in counts for lo in range(0, cnt, self._chunk)]
        blocks = [self._element_block(xz, z) for xz, z in zip(xs.split(sizes, dim=2), elements)]
        if not blocks:
            return x.new_zeros(0, self.irreps_out.dim)
        ys = torch.cat(blocks, 0)
        return torch.empty_like(ys).index_copy(0, order, ys)

    def _element_block(self, xz: torch.Tensor, z: int) -> torch.Tensor:
        """Outputs (nodes, irreps_out.dim) for nodes of element z; xz is (c, i, nodes)."""
        c, d, b = xz.shape
        outs = []
        for index, contraction in enumerate(self.contractions):
            us = self.u_by_degree(contraction)
            ws = [self.effective(name) for name in self.weight_names(index, contraction)]
            m = us[0].shape[0] if us[0].dim() == 3 else 1  # U_1 is (m, i, k), or (i, k) for l = 0
            t = None
            for nu in range(len(us), 0, -1):
                r = m * d ** (nu - 1)
                # A_nu[c, (m, i_1..i_nu-1), i_nu] = sum_k U_nu[..., k] W_nu[z, k, c]
                a = torch.matmul(us[nu - 1].reshape(-1, us[nu - 1].shape[-1]), ws[nu - 1][z])
                ax = torch.bmm(a.t().reshape(c, r, d), xz)  # (c, r, b)
                if t is None:
                    t = ax
                else:  # T <- (T + A) . x, contracting the last coupling index
                    t = (t.view(c, r, d, b) * xz.unsqueeze(1)).sum(2) + ax
            outs.append(t.permute(2, 0, 1).reshape(b, c * m))  # mul_ir layout
        return torch.cat(outs, 1)

    def to_mace(self):
        return self.to_replaced()

    def extra_repr(self) -> str:
        return (f"{self.irreps_in} -> {self.irreps_out}, {self.num_elements} elements, "
                f"backend={self.backend}")
