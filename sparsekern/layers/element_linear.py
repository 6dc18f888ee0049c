"""Element-indexed linear: replaces ``FullyConnectedTensorProduct(x, one_hot(Z))``
(MACE's ``skip_tp``, SevenNet's self-connection) by one linear map per element,
instead of e3nn's dense product over the one-hot (n_elements times the FLOPs)."""

from __future__ import annotations

from math import sqrt
from typing import List, NamedTuple, Optional

import torch
from e3nn import o3

from .base import SparsekernLayer, WeightGroup, split_segments
from .linear import _cat_slots


class ElementPath(NamedTuple):
    i_in: int
    i_out: int
    mul_in: int
    mul_out: int
    scale: float  # e3nn's path weight times the (l, 0, l) Clebsch-Gordan value 1/sqrt(2l+1)
    weight_offset: int


class ElementLinear(SparsekernLayer):
    """y[n] = sum_paths scale * x[n] W_path[:, z_n, :] for one-hot node attributes.

    ``weight`` keeps e3nn's flat layout, each path a (mul_in, n_elements, mul_out)
    block, so the layer is a drop-in replacement of the tensor product."""

    implemented_backends = ("torch", "cuda", "triton")

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
        paths: List[ElementPath] = []
        offset = 0
        for ins in ref.instructions:
            mul_in, mul_out = self.irreps_in[ins.i_in1].mul, self.irreps_out[ins.i_out].mul
            numel = mul_in * self.num_elements * mul_out
            if numel:
                d = self.irreps_out[ins.i_out].ir.dim
                paths.append(ElementPath(ins.i_in1, ins.i_out, mul_in, mul_out, ins.path_weight / sqrt(d), offset))
            offset += numel
        self.paths = paths
        self.weight_numel = offset
        self.weight = ref.weight
        self._replaced = ref

    def path_weights(self, weight: torch.Tensor) -> List[torch.Tensor]:
        """The (n_elements, mul_in, mul_out) block of each path."""
        n_el = self.num_elements
        pieces = split_segments(weight, [(p.weight_offset, p.mul_in * n_el * p.mul_out) for p in self.paths])
        return [w.view(p.mul_in, n_el, p.mul_out).transpose(0, 1) for w, p in zip(pieces, self.paths)]

    def species(self, node_attrs: torch.Tensor) -> torch.Tensor:
        """Element index per node; refuses attributes that are not one-hot, since the
        per-element linear would silently differ from the tensor product on them."""
        if node_attrs.dim() != 2 or node_attrs.shape[1] != self.num_elements:
            raise ValueError(
                f"ElementLinear: node_attrs must have shape (num_nodes, {self.num_elements}), "
                f"got {tuple(node_attrs.shape)}"
            )
        if not torch.compiler.is_compiling() and node_attrs.shape[0]:
            ones = node_attrs.sum(-1) == 1
            binary = ((node_attrs == 0) | (node_attrs == 1)).all(-1)
            if not bool((ones & binary).all()):
                raise ValueError("ElementLinear: node_attrs must be one-hot (one 1 per row, zeros elsewhere)")
        return node_attrs.argmax(-1)

    def forward(self, x: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        self._check_features(x, self.irreps_in.dim, "x")
        self._check_same(self.weight, x, "x")
        if node_attrs.device != x.device:
            raise ValueError(f"ElementLinear: node_attrs on {node_attrs.device}, x on {x.device}")
        if node_attrs.shape[0] != x.shape[0]:
            raise ValueError(f"ElementLinear: {x.shape[0]} nodes in x but {node_attrs.shape[0]} in node_attrs")
        species = self.species(node_attrs)
        if self.backend == "cuda" and x.is_cuda:
            return self._forward_cuda(x, species)
        if self.backend == "triton":
            return self._forward_triton(x, species)
        return self._forward_torch(x, species)

    def _forward_torch(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # Sort nodes by element once: each element is then one contiguous GEMM.
        order = torch.argsort(species, stable=True)
        counts = torch.bincount(species, minlength=self.num_elements).tolist()
        present = [z for z, c in enumerate(counts) if c]
        sizes = [counts[z] for z in present]
        present_index = torch.tensor(present, dtype=torch.long, device=x.device)
        x_blocks = x.index_select(0, order).split([mul_ir.dim for mul_ir in self.irreps_in], dim=1)
        outs: List[Optional[torch.Tensor]] = [None] * len(self.irreps_out)
        for p, w in zip(self.paths, self.path_weights(self.effective("weight")) if self.paths else []):
            d = self.irreps_in[p.i_in].ir.dim
            xi = x_blocks[p.i_in].reshape(n, p.mul_in, d).transpose(1, 2).reshape(n * d, p.mul_in)
            w = w * p.scale
            # gather the present elements' matrices once (one gradient scatter, not one
            # zero-filled tensor per element of the table)
            w_el = w.index_select(0, present_index).unbind(0)
            # 2-D products (see IrrepsLinear.forward)
            blocks = [torch.mm(xz, wz) for xz, wz in zip(xi.split([c * d for c in sizes], 0), w_el)]
            yi = torch.cat(blocks, 0) if blocks else xi.new_zeros(0, p.mul_out)
            yi = yi.view(n, d, p.mul_out).transpose(1, 2).reshape(n, p.mul_out * d)
            outs[p.i_out] = yi if outs[p.i_out] is None else outs[p.i_out] + yi
        ys = _cat_slots(outs, self.irreps_out, x)
        return torch.empty_like(ys).index_copy(0, order, ys) if n else ys

    def _forward_triton(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """W0 + dW formed tile by tile in the kernel from the delta's active 16x16 blocks."""
        from ..kernels.triton import element_linear_layer
        from ..kernels.triton.element_linear import attached_delta_blocks

        return element_linear_layer(self, x, species, attached_delta_blocks(self, 16))

    def _forward_cuda(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        from ..kernels import cuda

        n = x.shape[0]
        x_blocks = x.split([mul_ir.dim for mul_ir in self.irreps_in], dim=1)
        outs: List[Optional[torch.Tensor]] = [None] * len(self.irreps_out)
        for p, w in zip(self.paths, self.path_weights(self.effective("weight")) if self.paths else []):
            d = self.irreps_in[p.i_in].ir.dim
            xi = x_blocks[p.i_in].reshape(n, p.mul_in, d)
            yi = cuda.element_linear(xi, w, species, p.scale)
            yi = yi.reshape(n, p.mul_out * d)
            outs[p.i_out] = yi if outs[p.i_out] is None else outs[p.i_out] + yi
        return _cat_slots(outs, self.irreps_out, x)

    def weight_groups(self) -> List[WeightGroup]:
        return [WeightGroup("weight", p.weight_offset, (self.num_elements, p.mul_in, p.mul_out), "rgc",
                            f"{self.irreps_in[p.i_in]}->{self.irreps_out[p.i_out]}",
                            self.irreps_in[p.i_in].ir.l, True) for p in self.paths]

    def to_e3nn(self):
        return self.to_replaced()

    def extra_repr(self) -> str:
        return (f"{self.irreps_in} x {self.num_elements} elements -> {self.irreps_out}, "
                f"{self.weight_numel} weights, backend={self.backend}")
