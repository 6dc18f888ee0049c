"""MACE's symmetric contraction (the product basis), both parametrisations
(``use_reduced_cg`` on and off: they differ only in the U tensors and weight shapes).

For the element z of each node, out[c, m] = sum_nu sum_k W_nu[z, k, c] U_nu[m, i_1..i_nu, k]
prod_j x[c, i_j]. The product of x's is symmetric in i_1..i_nu, so U_nu is summed over
the orderings of each index tuple once (U'_nu[m, q, k], q a sorted tuple) and only the
tuples where U' is nonzero are kept: of the 4,096 degree-3 index tuples of an l <= 3
input, 367 monomials remain for 0e+1o outputs. Per element present, W is folded into
U' (one 2-D product: A[c, m, q]); each node's monomials F[c, q] are built degree by
degree (a gather and a product per degree), and the output is one batched product over
channels per element, A (c, m, q) @ F (c, q, nodes)."""

from __future__ import annotations

from typing import List, NamedTuple

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
        if n == 0:
            return x.new_zeros(0, self.irreps_out.dim)
        tables = self._const("monomials", x, self._monomial_tables)
        order = torch.argsort(species, stable=True)
        counts = torch.bincount(species, minlength=self.num_elements).tolist()
        present = [z for z, cnt in enumerate(counts) if cnt]
        coef = self._coefficients(tables, torch.tensor(present, device=x.device))  # (elements present, c, M, Q)
        # (c, i, nodes), contiguous: channels are the batch of the product below
        xs = x.index_select(0, order).permute(1, 2, 0).contiguous()
        # chunks bound the (c, Q, nodes) monomials; split (not slicing) keeps the
        # backward to one concatenation instead of one zero-filled tensor per chunk
        chunk = max(1, 2 ** 24 // (self.num_features * tables.num_monomials))
        which = [j for j, z in enumerate(present) for _ in range(0, counts[z], chunk)]
        sizes = [min(chunk, counts[z] - lo) for z in present for lo in range(0, counts[z], chunk)]
        blocks = [torch.bmm(coef[j], self._monomials(xz, tables)) for xz, j in zip(xs.split(sizes, dim=2), which)]
        y = torch.cat(blocks, 2).permute(2, 0, 1)  # (nodes, c, M)
        ys = torch.cat([yl.reshape(n, -1) for yl in y.split(tables.m, dim=2)], 1)  # mul_ir layout
        return torch.empty_like(ys).index_copy(0, order, ys)

    def _monomial_tables(self) -> "_MonomialTables":
        return _MonomialTables.build([self.u_by_degree(con) for con in self.contractions], self.coupling_dim)

    @staticmethod
    def _monomials(xz: torch.Tensor, tables: "_MonomialTables") -> torch.Tensor:
        """F (c, Q, nodes): every kept monomial, degree by degree; xz is (c, i, nodes)."""
        levels = [xz]
        for parent, last in zip(tables.parent, tables.last):
            levels.append(levels[-1].index_select(1, parent) * xz.index_select(1, last))
        return torch.cat(levels, 1)

    def _coefficients(self, tables: "_MonomialTables", present: torch.Tensor) -> torch.Tensor:
        """A[e, c, M, Q] = sum_k U'[M, Q, k] W[present[e], k, c], outputs stacked along M."""
        c, zp = self.num_features, len(present)
        per_output = []
        for j, contraction in enumerate(self.contractions):
            ws = [self.effective(name) for name in self.weight_names(j, contraction)]
            per_degree = []
            # degrees above this output's correlation (a per-irrep correlation) have k = 0
            for u, w in zip(tables.u[j], ws + [None] * (len(tables.u[j]) - len(ws))):
                m, q, k = u.shape
                if k == 0:
                    per_degree.append(u.new_zeros(zp, m, q, c))
                    continue
                wz = w.index_select(0, present)  # (zp, k, c)
                per_degree.append(torch.matmul(u.reshape(m * q, k), wz).view(zp, m, q, c))
            per_output.append(torch.cat(per_degree, 2))
        return torch.cat(per_output, 1).permute(0, 3, 1, 2).contiguous()

    def to_mace(self):
        return self.to_replaced()

    def extra_repr(self) -> str:
        return (f"{self.irreps_in} -> {self.irreps_out}, {self.num_elements} elements, "
                f"backend={self.backend}")


class _MonomialTables(NamedTuple):
    """Kept monomials of each degree and U summed over index orderings.

    Degree nu >= 2 keeps the sorted tuples q where some output's U' is nonzero, closed
    under dropping the last index; monomial q is monomial q[:-1] (row ``parent`` of the
    previous degree) times x[q[-1]] (``last``). Degree 1 keeps every index."""

    parent: List[torch.Tensor]  # per degree 2.., (Q_nu,) rows in the previous degree
    last: List[torch.Tensor]  # per degree 2.., (Q_nu,) coupling index of the new factor
    tuples: List[torch.Tensor]  # per degree, (Q_nu, nu) the kept sorted index tuples
    u: List[List[torch.Tensor]]  # per output, per degree: U' (m, Q_nu, k)
    m: List[int]  # per output, its irrep dimension
    num_monomials: int

    @classmethod
    def build(cls, us_per_output: List[List[torch.Tensor]], d: int) -> "_MonomialTables":
        correlation = max(len(us) for us in us_per_output)
        summed = []  # per output, per degree: (m, d^nu, k), indexed by the sorted tuple's key
        for us in us_per_output:
            per_degree = []
            for nu, u in enumerate(us, start=1):
                u = u.detach().to("cpu", torch.float64)
                m = u.shape[0] if u.dim() == nu + 2 else 1  # U_nu is (m, i.., k), or (i.., k) for l = 0
                u = u.reshape(m, d ** nu, u.shape[-1])
                per_degree.append(torch.zeros_like(u).index_add_(1, _sorted_key(nu, d), u))
            summed.append(per_degree)
        # keys of the kept tuples, from the highest degree down (closure under prefixes)
        keys: List[torch.Tensor] = [torch.arange(d)]
        needed = None
        for nu in range(correlation, 1, -1):
            nonzero = torch.zeros(d ** nu, dtype=torch.bool)
            for per_degree in summed:
                if len(per_degree) >= nu:
                    nonzero |= per_degree[nu - 1].ne(0).any(2).any(0)
            here = torch.nonzero(nonzero).flatten()
            if needed is not None:
                here = torch.unique(torch.cat([here, needed]))
            keys.insert(1, here)
            needed = here // d
        parent = [torch.searchsorted(keys[nu - 1], keys[nu] // d) for nu in range(1, correlation)]
        last = [keys[nu] % d for nu in range(1, correlation)]
        u = [[per_degree[nu - 1][:, keys[nu - 1], :] if nu <= len(per_degree)
              else per_degree[0].new_zeros(per_degree[0].shape[0], len(keys[nu - 1]), 0)
              for nu in range(1, correlation + 1)] for per_degree in summed]
        tuples = [torch.stack([key // d ** (nu - 1 - j) % d for j in range(nu)], 1)
                  for nu, key in enumerate(keys, start=1)]
        return cls(parent, last, tuples, u, [per_degree[0].shape[0] for per_degree in summed],
                   sum(len(k) for k in keys))


def _sorted_key(nu: int, d: int) -> torch.Tensor:
    """For each ordered tuple (i_1..i_nu) in row-major order, the base-d number of its
    sorted digits (i_1 <= .. <= i_nu, i_1 most significant)."""
    digits = torch.stack(torch.meshgrid(*[torch.arange(d)] * nu, indexing="ij"), -1).reshape(-1, nu)
    weights = d ** torch.arange(nu - 1, -1, -1)
    return (digits.sort(1).values * weights).sum(1)
