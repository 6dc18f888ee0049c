"""The path vocabulary every layer, op and delta shares: a path of a linear or tensor
product (:class:`Path`), the block of weights a delta may change (:class:`WeightGroup`),
the integers of an irreps' blocks (:class:`Blocks`), and the two helpers that split flat
weights into paths and sum paths into output blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch


class Path(NamedTuple):
    """One path of a linear (``i_in -> i_out``, a (mul_in, mul_out) weight matrix, per
    element for element-indexed linears) or of a channelwise tensor product (``i_in`` x
    ``i_in2`` -> ``i_out``, one weight per channel: mul_out = mul_in)."""

    i_in: int  # block of the (first) input irreps
    i_out: int  # block of the output irreps
    mul_in: int
    mul_out: int
    scale: float  # path normalisation (e3nn's path_weight; element linears fold in 1/sqrt(2l+1))
    weight_offset: int  # start of its weights in the flat weight (per edge for tensor products)
    i_in2: int = -1  # block of the second operand (tensor products only)


@dataclass(frozen=True)
class WeightGroup:
    """One block of path weights inside a parameter, seen as (G, R, C) matrices:
    G elements (1 where the weight is shared), R x C the path's weight matrix.
    Sparse deltas, their tiles, statistics and adapters are all defined on groups."""

    param: str  # parameter name inside the layer
    offset: int  # start in the flattened parameter
    shape: Tuple[int, int, int]  # (G, R, C)
    layout: str  # memory order of the flat segment: "grc", or "rgc" for e3nn's element-indexed products
    label: str  # e.g. "64x1o->64x1o", "0e nu=3", "radial layer 3"
    l: Optional[int]  # irrep order of the path; None for radial MLPs
    per_element: bool

    @property
    def numel(self) -> int:
        g, r, c = self.shape
        return g * r * c

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The (G, R, C) view of this group's segment of a flattened parameter."""
        g, r, c = self.shape
        seg = flat.narrow(0, self.offset, self.numel)
        return seg.view(g, r, c) if self.layout == "grc" else seg.view(r, g, c).transpose(0, 1)

    def flatten(self, grc: torch.Tensor) -> torch.Tensor:
        """Inverse of ``view``: the segment in memory order, flattened."""
        return (grc if self.layout == "grc" else grc.transpose(0, 1)).reshape(-1)


def split_segments(t: torch.Tensor, segments, dim: int = -1) -> List[torch.Tensor]:
    """The pieces of ``t`` at (offset, size) segments, sorted by offset, by one split:
    its backward is one concatenation, where slicing zero-fills a full-size gradient
    per piece."""
    sizes, keep, pos = [], [], 0
    for off, size in segments:
        if off > pos:
            sizes.append(off - pos)
            keep.append(False)
        sizes.append(size)
        keep.append(True)
        pos = off + size
    if pos < t.shape[dim]:
        sizes.append(t.shape[dim] - pos)
        keep.append(False)
    return [piece for piece, k in zip(t.split(sizes, dim), keep) if k]


def cat(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat`` whose backward is one split: autograd's narrows the gradient per
    piece, and differentiated again (force training) each narrow comes back as a
    zero-filled full-size tensor, summed; the split comes back as one concatenation."""
    return tensors[0] if len(tensors) == 1 else _Cat.apply(dim, *tensors)


class _Cat(torch.autograd.Function):
    @staticmethod
    def forward(dim: int, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.cat(tensors, dim)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # as torch.func needs (MACE's compile route)
        dim, *tensors = inputs
        ctx.dim, ctx.sizes = dim, [t.shape[dim] for t in tensors]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *grad.split(ctx.sizes, ctx.dim))


class Blocks(NamedTuple):
    """The integers of an ``o3.Irreps`` that forwards read, built once by a descriptor:
    ``torch.compile`` guards each e3nn ``Irrep`` a forward touches as a sequence, and
    ``len(Irrep)`` raises, so no forward reads an e3nn object."""

    muls: Tuple[int, ...]  # multiplicity of each block
    dims: Tuple[int, ...]  # irrep dimension (2l + 1) of each block
    sizes: Tuple[int, ...]  # mul * dim: each block's width in the features
    offsets: Tuple[int, ...]  # each block's first feature
    dim: int  # the features' width

    @classmethod
    def of(cls, irreps) -> "Blocks":
        muls, dims = tuple(mul for mul, _ in irreps), tuple(ir.dim for _, ir in irreps)
        sizes = tuple(m * d for m, d in zip(muls, dims))
        offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        return cls(muls, dims, sizes, offsets, sum(sizes))

    def slice(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])


class OutputSlots:
    """Per output block, the sum of the paths written into it; ``cat`` concatenates them
    with zeros where no path writes (``sizes``: the blocks' widths, ``Blocks.sizes``)."""

    def __init__(self, sizes: Tuple[int, ...]) -> None:
        self.sizes = sizes
        self.outs: List[Optional[torch.Tensor]] = [None] * len(sizes)

    def add(self, i_out: int, y: torch.Tensor) -> None:
        self.outs[i_out] = y if self.outs[i_out] is None else self.outs[i_out] + y

    def cat(self, like: torch.Tensor) -> torch.Tensor:
        n = like.shape[0]
        parts = [o if o is not None else like.new_zeros(n, size) for o, size in zip(self.outs, self.sizes)]
        return torch.cat(parts, dim=1) if parts else like.new_zeros(n, 0)

