"""Ops of the torch back end whose Python control flow reads tensor values (species
counts in the element linear and the contraction, in-degrees in the fused conv) run
under torch.compile as one opaque custom op, ``sparsekern::opaque``. Traced, those values
would be baked into the graph as constants or break it, and behind a graph break MACE's
compile route (``torch.autograd.grad`` traced into the graph) returns wrong forces.
Eager calls run the function itself.

The op calls the function on real tensors. Its backward is the op one order higher:
the vector-Jacobian product of the order below, recomputed by ``torch.func.vjp`` inside
the op (so compiled gradients cost one more forward of these ops), which makes every
order of derivative the op again: forces in a loss (double backward) work. So the
functions must be differentiable by ``torch.func`` (an ``autograd.Function`` in them
needs ``setup_context``)."""

from __future__ import annotations

import functools
from typing import Callable, Dict, List

import torch
from torch.compiler import is_compiling

from ..descriptors import Descriptor

_FUNCTIONS: Dict[str, Callable[..., torch.Tensor]] = {}
# The dispatch keys of plain eager code (this module is imported by eager code): the op's
# implementation runs below autograd, and on a compiled graph's first run inside
# AOTAutograd's dispatch mode, below functorch too, where torch.func cannot record.
_EAGER_KEYS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def opaque_to_compile(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn(desc, *tensors)`` itself in eager code, the op under torch.compile. ``fn``
    returns the rows of its first tensor with ``desc.blocks_out.dim`` columns (what the
    op's fake implementation assumes)."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    _FUNCTIONS[name] = fn

    @functools.wraps(fn)
    def run(desc: Descriptor, *tensors: torch.Tensor) -> torch.Tensor:
        if is_compiling():
            return opaque(name, desc.key, [], list(tensors))[0]
        return fn(desc, *tensors)

    return run


@torch.library.custom_op("sparsekern::opaque", mutates_args=())
def opaque(name: str, desc: int, wrt: List[int], args: List[torch.Tensor]) -> List[torch.Tensor]:
    """Order 0 (``wrt`` empty): [function(descriptor, *args)]. Order k = len(wrt): the
    gradients of <order k-1 (inputs), cotangents> with respect to the inputs in the
    bitmask ``wrt[-1]``; ``args`` is the inputs followed by the cotangents."""
    with torch._C._ForceDispatchKeyGuard(*_EAGER_KEYS):
        return _order(_FUNCTIONS[name], Descriptor.by_key(desc), wrt, args)


def _order(fn, descriptor: Descriptor, wrt: List[int], args: List[torch.Tensor]) -> List[torch.Tensor]:
    """``opaque`` as a function of its tensors, differentiable by ``torch.func``."""
    if not wrt:
        return [fn(descriptor, *args)]
    inputs, cotangents = _split(wrt, args)
    chosen = [i for i in range(len(inputs)) if wrt[-1] >> i & 1]

    def below(*xs: torch.Tensor) -> List[torch.Tensor]:
        full = list(inputs)
        for i, x in zip(chosen, xs):
            full[i] = x
        return _order(fn, descriptor, wrt[:-1], full)

    _, pullback = torch.func.vjp(below, *(inputs[i] for i in chosen))
    return list(pullback(cotangents))


def _split(wrt: List[int], args: List[torch.Tensor]):
    """(inputs, cotangents) of order len(wrt): one cotangent per output of the order below."""
    outputs = bin(wrt[-2]).count("1") if len(wrt) > 1 else 1
    return args[:len(args) - outputs], args[len(args) - outputs:]


@opaque.register_fake
def _(name: str, desc: int, wrt: List[int], args: List[torch.Tensor]) -> List[torch.Tensor]:
    if not wrt:
        return [args[0].new_empty(args[0].shape[0], Descriptor.by_key(desc).blocks_out.dim)]
    inputs, _ = _split(wrt, args)
    return [torch.empty_like(a) for i, a in enumerate(inputs) if wrt[-1] >> i & 1]


def _setup_context(ctx, inputs, output) -> None:
    ctx.name, ctx.desc, ctx.wrt, args = inputs
    ctx.save_for_backward(*args)


def _backward(ctx, grads: List[torch.Tensor]):
    need = ctx.needs_input_grad[3]
    mask = sum(1 << i for i, n in enumerate(need) if n)
    out = iter(opaque(ctx.name, ctx.desc, [*ctx.wrt, mask], [*ctx.saved_tensors, *grads]))
    # autograd takes an empty ``wrt`` for an empty list of tensors, whose gradient is []
    return None, None, None if ctx.wrt else [], [next(out) if n else None for n in need]


opaque.register_autograd(_backward, setup_context=_setup_context)
