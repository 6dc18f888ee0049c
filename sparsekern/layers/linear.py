"""Irrep linear (replaces ``e3nn.o3.Linear``): block-diagonal over irreps."""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from e3nn import o3

from .base import SparsekernLayer, WeightGroup, split_segments


class LinearPath(NamedTuple):
    i_in: int
    i_out: int
    mul_in: int
    mul_out: int
    path_weight: float
    weight_offset: int


class IrrepsLinear(SparsekernLayer):
    """y_i = sum over paths into i of path_weight * x_in W_path, e3nn's layout and
    normalisation. ``weight`` is flat in instruction order, as in ``o3.Linear``."""

    implemented_backends = ("torch", "triton")

    def __init__(self, irreps_in, irreps_out, instructions=None, biases=False, path_normalization="element"):
        super().__init__()
        self._init_from(o3.Linear(irreps_in, irreps_out, instructions=instructions, biases=biases,
                                  path_normalization=path_normalization))

    @classmethod
    def unsupported_reason(cls, module: o3.Linear) -> Optional[str]:
        if not module.internal_weights or not module.shared_weights:
            return "external or per-sample weights"
        if getattr(module, "f_in", None) is not None or getattr(module, "f_out", None) is not None:
            return "f_in/f_out feature dimensions"
        return None

    def _init_from(self, ref: o3.Linear) -> None:
        self.weight = ref.weight if isinstance(ref.weight, torch.nn.Parameter) else None
        self.bias = ref.bias if isinstance(ref.bias, torch.nn.Parameter) else None
        self._replaced = ref
        self.irreps_in = o3.Irreps(ref.irreps_in)
        self.irreps_out = o3.Irreps(ref.irreps_out)
        paths: List[LinearPath] = []
        bias_paths = []
        offset = bias_offset = 0
        for ins in ref.instructions:
            if ins.i_in == -1:
                bias_paths.append((ins.i_out, bias_offset))
                bias_offset += self.irreps_out[ins.i_out].dim
                continue
            mul_in, mul_out = self.irreps_in[ins.i_in].mul, self.irreps_out[ins.i_out].mul
            if mul_in * mul_out == 0:
                continue
            paths.append(LinearPath(ins.i_in, ins.i_out, mul_in, mul_out, float(ins.path_weight), offset))
            offset += mul_in * mul_out
        self.paths = paths
        self.bias_paths = bias_paths
        self.weight_numel = offset

    def path_weights(self, weight: torch.Tensor) -> List[torch.Tensor]:
        """The (mul_in, mul_out) block of each path."""
        pieces = split_segments(weight, [(p.weight_offset, p.mul_in * p.mul_out) for p in self.paths])
        return [w.view(p.mul_in, p.mul_out) for w, p in zip(pieces, self.paths)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_features(x, self.irreps_in.dim, "x")
        if self.weight is not None:
            self._check_same(self.weight, x, "x")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.irreps_in.dim)
        n = x.shape[0]
        outs = self._paths_triton(x) if self.backend == "triton" else self._paths_torch(x)
        if self.bias_paths:
            dims = [self.irreps_out[i_out].dim for i_out, _ in self.bias_paths]
            for (i_out, _), b in zip(self.bias_paths, split_segments(self.bias, zip([o for _, o in self.bias_paths], dims))):
                b = b.expand(n, b.shape[0])
                outs[i_out] = b if outs[i_out] is None else outs[i_out] + b
        y = _cat_slots(outs, self.irreps_out, x)
        return y.reshape(*lead, self.irreps_out.dim)

    def _paths_torch(self, x: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """Per output irrep, the sum of its paths (None where none writes)."""
        n = x.shape[0]
        outs: List[Optional[torch.Tensor]] = [None] * len(self.irreps_out)
        x_blocks = x.split([mul_ir.dim for mul_ir in self.irreps_in], dim=1)
        ws = self.path_weights(self.effective("weight")) if self.paths else []
        for p, w in zip(self.paths, ws):
            d = self.irreps_in[p.i_in].ir.dim
            xi = x_blocks[p.i_in].reshape(n, p.mul_in, d)
            w = w * p.path_weight
            # one 2-D product: torch.matmul on 3-D operands picks its summation order by
            # requires_grad, which would make results depend on what is being trained
            yi = torch.mm(xi.transpose(1, 2).reshape(n * d, p.mul_in), w)
            yi = yi.view(n, d, p.mul_out).transpose(1, 2).reshape(n, p.mul_out * d)
            outs[p.i_out] = yi if outs[p.i_out] is None else outs[p.i_out] + yi
        return outs

    def _paths_triton(self, x: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """As ``_paths_torch`` on the element-linear kernel with one element: W0 + dW formed
        tile by tile from the delta's active 16x16 blocks, never materialised."""
        from ..kernels.triton.element_linear import attached_delta_blocks, irreps_linear_paths

        return irreps_linear_paths(self, x, attached_delta_blocks(self, 16))

    def weight_groups(self) -> List[WeightGroup]:
        return [WeightGroup("weight", p.weight_offset, (1, p.mul_in, p.mul_out), "grc",
                            f"{self.irreps_in[p.i_in]}->{self.irreps_out[p.i_out]}",
                            self.irreps_in[p.i_in].ir.l, False) for p in self.paths]

    def to_e3nn(self) -> o3.Linear:
        return self.to_replaced()

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, {self.weight_numel} weights, backend={self.backend}"


def _cat_slots(outs, irreps_out, like: torch.Tensor) -> torch.Tensor:
    """Concatenate per-irrep outputs, zeros where no path writes."""
    n = like.shape[0]
    parts = [o if o is not None else like.new_zeros(n, mul_ir.dim) for o, mul_ir in zip(outs, irreps_out)]
    if not parts:
        return like.new_zeros(n, 0)
    return torch.cat(parts, dim=1)
