"""Torch reference of e3nn's ``Gate``: the activated scalars and gates in one pass per
activation function, each gate spread over its irrep's components by one index, one
product, one concatenation: 8 aten ops where e3nn's Extract, Activation and
ElementwiseTensorProduct issue 66-72 (59 against 371 with force training's two
derivatives, tests/layers/test_gate.py; SiLU through ``silu.py``); derivatives of every
order."""

from __future__ import annotations

import torch

from ..descriptors import GateDesc, is_silu
from .silu import silu


def _columns(desc: GateDesc, x: torch.Tensor, name: str) -> torch.Tensor:
    """x's columns ``getattr(desc, name)``: a view where they are consecutive."""
    span = desc.spans[name]
    if span is not None:
        return x.narrow(-1, *span)
    return x.index_select(-1, desc.const(name, x, lambda: torch.tensor(getattr(desc, name))))


def _activate(act, z: torch.Tensor) -> torch.Tensor:
    """e3nn's ``act(z)``; its normalized SiLU through :func:`silu` (the same values, far
    fewer ops in force training's derivatives)."""
    if not is_silu(act):
        return act(z)
    y = silu(z)
    return y if act._is_id else y.mul(act.cst)


def gate(desc: GateDesc, x: torch.Tensor) -> torch.Tensor:
    a = _columns(desc, x, "activated")
    pieces = []
    for start, n, act in desc.runs:
        z = a if n == a.shape[-1] else a.narrow(-1, start, n)
        pieces.append(z if act is None else _activate(act, z))
    if pieces:
        a = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
    if not desc.gated:
        return a
    gates = a.index_select(-1, desc.const("expand", x, lambda: torch.tensor(desc.expand)))
    return torch.cat([a.narrow(-1, 0, desc.num_scalars), _columns(desc, x, "gated") * gates], -1)
