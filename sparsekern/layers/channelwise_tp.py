"""Channelwise 'uvu' tensor product with external per-edge weights (MACE's and
SevenNet's ``conv_tp``), and the fused convolution that gathers senders and
scatters to receivers (the ``conv_fusion`` contract of MACE)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from e3nn import o3

from ..ops.descriptors import TPDesc
from ..paths import Path
from ..ops.tensor_cache import cached
from .base import SparsekernLayer, refuse_unless


class ChannelwiseTP(SparsekernLayer):
    """out[e, path, u, k] = path_weight * w[e, path, u] * sum_ij C[i, j, k] x1[e, u, i] x2[e, j]

    with C e3nn's ``wigner_3j``."""

    op = "channelwise_tp"

    def __init__(self, irreps_in1, irreps_in2, irreps_out, instructions):
        super().__init__()
        self._init_from(o3.TensorProduct(irreps_in1, irreps_in2, irreps_out, instructions,
                                         shared_weights=False, internal_weights=False))

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module) -> Optional[str]:
        for ins in module.instructions:
            if ins.connection_mode != "uvu" or not ins.has_weight:
                unweighted = "" if ins.has_weight else " without weights"
                return f"instruction mode {ins.connection_mode!r}{unweighted} (only weighted 'uvu' is supported)"
            if o3.Irreps(module.irreps_in2)[ins.i_in2].mul != 1:
                return "second operand with multiplicity > 1"
        if module.internal_weights or module.shared_weights:
            return "internal or shared weights (expected per-edge external weights)"
        return None

    def _init_from(self, ref) -> None:
        self.irreps_in1 = o3.Irreps(ref.irreps_in1)
        self.irreps_in2 = o3.Irreps(ref.irreps_in2)
        self.irreps_out = o3.Irreps(ref.irreps_out)
        paths: List[Path] = []
        offset = 0
        for ins in ref.instructions:
            mul = self.irreps_in1[ins.i_in1].mul
            if mul and self.irreps_in2[ins.i_in2].dim and self.irreps_out[ins.i_out].dim:
                paths.append(Path(ins.i_in1, ins.i_out, mul, mul, float(ins.path_weight), offset, ins.i_in2))
            offset += mul
        self.weight_numel = offset
        self._replaced = ref
        self.desc = TPDesc(self.irreps_in1, self.irreps_in2, self.irreps_out, tuple(paths), offset, _module_w3j(ref))

    def _check(self, x1, x2, weight, n1: int) -> None:
        # the descriptor's integers, not the irreps' (see paths.Blocks)
        self._check_features(x1, self.desc.blocks_in1.dim, "x1", self.irreps_in1)
        self._check_features(x2, self.desc.blocks_in2.dim, "x2", self.irreps_in2)
        self._check_same(x1, x2, "x2")
        self._check_same(x1, weight, "weight")
        if weight.shape != (x2.shape[0], self.weight_numel):
            raise ValueError(
                f"{type(self).__name__}: weight must have shape ({x2.shape[0]}, {self.weight_numel}), "
                f"got {tuple(weight.shape)}")
        if x1.dim() != 2 or x2.dim() != 2 or x1.shape[0] != n1:
            raise ValueError(f"{type(self).__name__}: x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} must be "
                             f"2-D with {n1} and {x2.shape[0]} rows")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self._check(x1, x2, weight, x2.shape[0])
        return self._run(x1, x2, weight)

    def extra_repr(self) -> str:
        return (f"{self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out}, {len(self.desc.paths)} paths, "
                f"weight_numel={self.weight_numel}, backend={self.backend_name}")


def _module_w3j(module: torch.nn.Module) -> Dict[Tuple[int, int, int], torch.Tensor]:
    """Wigner 3j buffers of an e3nn tensor product, by (l1, l2, l_out), in float64."""
    found = {}
    for name, buf in module.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("_w3j_"):
            l1, l2, lo = (int(v) for v in leaf[len("_w3j_"):].split("_"))
            found[(l1, l2, lo)] = buf.detach().to("cpu", torch.float64)
    return found


class ChannelwiseConv(ChannelwiseTP):
    """Fused convolution: ``forward(node_feats, edge_attrs, tp_weights, edge_index)``
    returns sum over edges e with receiver(e) = n of the channelwise product of
    node_feats[sender(e)]; ``edge_index[0]`` holds senders, ``edge_index[1]`` receivers."""

    op = "conv"

    def forward(self, node_feats, edge_attrs, tp_weights, edge_index):  # type: ignore[override]
        n = node_feats.shape[0]
        if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.shape[1] != edge_attrs.shape[0]:
            raise ValueError(f"ChannelwiseConv: edge_index must have shape (2, {edge_attrs.shape[0]}), "
                             f"got {tuple(edge_index.shape)}")
        if edge_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ChannelwiseConv: edge_index must be an integer tensor, got {edge_index.dtype}")
        self._check(node_feats, edge_attrs, tp_weights, n)
        cached(edge_index, ("in range", n), lambda: _check_in_range(edge_index, n))  # once per graph
        return self._run(node_feats, edge_attrs, tp_weights, edge_index)


def _check_in_range(edge_index: torch.Tensor, n: int) -> bool:
    """Refuse node indices outside [0, n): the fused kernels would read past the node
    features or drop the edge."""
    if edge_index.shape[1] and not torch.compiler.is_compiling():
        low, high = edge_index.aminmax()
        refuse_unless((low >= 0) & (high < n),
                      f"ChannelwiseConv: edge_index must hold node indices in [0, {n}), the rows of node_feats")
    return True
