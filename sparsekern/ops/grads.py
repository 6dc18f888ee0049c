"""Which input gradients a custom autograd Function's backward must compute, and their sums.

``ctx.needs_input_grad`` is fixed at forward time: every weight (a Parameter) is marked,
so energy + forces, which asks autograd for the positions' gradient alone, would still
compute every weight gradient. Built-in ops skip what the running backward pass will not
use; :func:`needed` gives custom Functions the same test."""

import torch


def track(ctx, *args) -> None:
    """Call in a Function's forward (or setup_context) with all its arguments: autograd
    keeps an edge for each tensor argument only, in order, so :func:`needed` must know
    which arguments were tensors."""
    tensors = [i for i, a in enumerate(args) if torch.is_tensor(a)]
    ctx.edge_of = {i: k for k, i in enumerate(tensors)}


def needed(ctx, i: int) -> bool:
    """Whether argument ``i``'s gradient is used by the backward pass now running: marked
    at forward time and on the path of that pass."""
    if not ctx.needs_input_grad[i]:
        return False
    if torch.compiler.is_compiling():  # traced ahead of the pass: no graph to ask
        return True
    node = ctx.next_functions[ctx.edge_of[i]][0]
    try:
        return node is None or torch._C._will_engine_execute_node(node)
    except RuntimeError:  # backward called outside the autograd engine: compute it
        return True


def summed(a, b):
    """a + b of two gradients either of which may be None (not computed)."""
    return b if a is None else a if b is None else a + b
