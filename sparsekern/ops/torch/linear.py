"""Torch reference of the linears: irrep linear (``o3.Linear``) and element-indexed
linear (e3nn's product with a one-hot attribute), each path one 2-D product."""

from __future__ import annotations

from typing import Optional

import torch

from ...delta_slot import effective
from ...paths import OutputSlots
from ..descriptors import LinearDesc
from .opaque import opaque_to_compile


def linear(desc: LinearDesc, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           delta: Optional[torch.Tensor]) -> torch.Tensor:
    """y_i = sum over paths into i of scale * x_in W_path (+ bias): x (N, irreps_in.dim)."""
    n = x.shape[0]
    out = OutputSlots(desc.blocks_out.sizes)
    x_blocks = x.split(desc.blocks_in.sizes, dim=1)
    ws = desc.path_weights(effective(weight, delta)) if desc.paths else []
    for p, w in zip(desc.paths, ws):
        d = desc.blocks_in.dims[p.i_in]
        xi = x_blocks[p.i_in].reshape(n, p.mul_in, d)
        w = w[0] * p.scale
        # one 2-D product: torch.matmul on 3-D operands picks its summation order by
        # requires_grad, which would make results depend on what is being trained
        yi = torch.mm(xi.transpose(1, 2).reshape(n * d, p.mul_in), w)
        out.add(p.i_out, yi.view(n, d, p.mul_out).transpose(1, 2).reshape(n, p.mul_out * d))
    desc.add_biases(bias, out, n)
    return out.cat(x)


def element_linear(desc: LinearDesc, x: torch.Tensor, species: torch.Tensor, weight: torch.Tensor,
                   delta: Optional[torch.Tensor]) -> torch.Tensor:
    """y[n] = sum_paths scale * x[n] W_path[z_n]: nodes sorted by element once, so each
    element is one contiguous 2-D product per path."""
    return _element_linear(desc, x, species, effective(weight, delta))


@opaque_to_compile  # the sizes of the element groups are read on the host
def _element_linear(desc: LinearDesc, x: torch.Tensor, species: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    order = torch.argsort(species, stable=True)
    counts = torch.bincount(species, minlength=desc.num_elements).tolist()
    present = [z for z, c in enumerate(counts) if c]
    sizes = [counts[z] for z in present]
    present_index = torch.tensor(present, dtype=torch.long, device=x.device)
    x_blocks = x.index_select(0, order).split(desc.blocks_in.sizes, dim=1)
    out = OutputSlots(desc.blocks_out.sizes)
    for p, w in zip(desc.paths, desc.path_weights(weight) if desc.paths else []):
        d = desc.blocks_in.dims[p.i_in]
        xi = x_blocks[p.i_in].reshape(n, p.mul_in, d).transpose(1, 2).reshape(n * d, p.mul_in)
        w = w * p.scale
        # gather the present elements' matrices once (one gradient scatter, not one
        # zero-filled tensor per element of the table)
        w_el = w.index_select(0, present_index).unbind(0)
        blocks = [torch.mm(xz, wz) for xz, wz in zip(xi.split([c * d for c in sizes], 0), w_el)]
        yi = torch.cat(blocks, 0) if blocks else xi @ w[0]  # (no node: an empty product, in the graph)
        out.add(p.i_out, yi.view(n, d, p.mul_out).transpose(1, 2).reshape(n, p.mul_out * d))
    ys = out.cat(x)
    return torch.empty_like(ys).index_copy(0, order, ys) if n else ys
