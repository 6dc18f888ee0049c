"""Gathers whose gradient is a gather. ``index_select``'s backward zero-fills the
source's shape and scatters into it with ``index_add`` (on CPUs several times slower
than the gather, and again in force training's double backward). Where the gather reads
each source entry once at most, as a permutation or a map into padded slots does, its
gradient is the gather by the inverse map, and that one's gradient is the first again:
every order of derivative is a gather. Where entries are read many times
(:class:`TakeRows`), the gradient is an addition of rows, and its gradient the gather
again; both make their operand contiguous first, since a gradient can arrive transposed
and a gather of rows from a transposed tensor reads each row strided (several times
slower: ``cpu_step_ops.py --op aten.index_select.default``)."""

from __future__ import annotations

from typing import Optional

import torch


class Take(torch.autograd.Function):
    """``x.index_select(dim, index)`` with the entries ``zero`` of ``dim`` set to 0
    (``zero`` None: none). Its gradient is ``Take(g, dim, back, back_zero, index, zero)``:
    ``back`` gives, for each entry of x, where ``index`` reads it (``back_zero`` lists
    those it does not read, or None), so index must read each entry once at most outside
    ``zero``. Forward without ``ctx`` (``setup_context``): ``torch.func`` needs it."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int, index: torch.Tensor, zero: Optional[torch.Tensor],
                back: torch.Tensor, back_zero: Optional[torch.Tensor]) -> torch.Tensor:
        out = x.index_select(dim, index)
        return out if zero is None else out.index_fill_(dim, zero, 0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.dim = inputs[1]
        ctx.save_for_backward(*inputs[2:])  # the maps: constants

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, zero, back, back_zero = ctx.saved_tensors
        return Take.apply(grad, ctx.dim, back, back_zero, index, zero), None, None, None, None, None


def permute(x: torch.Tensor, dim: int, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, perm)`` for a permutation ``perm`` whose inverse is ``inverse``."""
    return Take.apply(x, dim, perm, None, inverse, None)


class TakeRows(torch.autograd.Function):
    """``x.index_select(0, rows)``, rows read any number of times; its gradient is
    :class:`AddRows` and that one's this again, so every order of derivative reads and
    writes whole contiguous rows."""

    @staticmethod
    def forward(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return x.contiguous().index_select(0, rows)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.n = inputs[0].shape[0]
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return AddRows.apply(grad, ctx.saved_tensors[0], ctx.n), None


class AddRows(torch.autograd.Function):
    """The rows of g added into n zero rows at ``rows`` (``index_add``)."""

    @staticmethod
    def forward(g: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
        return g.new_zeros(n, *g.shape[1:]).index_add_(0, rows, g.contiguous())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return TakeRows.apply(grad, ctx.saved_tensors[0]), None, None
