"""Triton kernels generated from source text: a kernel specialised to one layer's
constants (Clebsch-Gordan coefficients, offsets, multiplicities) written out as literals,
so the compiler sees every index and coefficient (no table loads, loops unrolled).

Triton reads a kernel's source with ``inspect``; a generated one is registered in
``linecache`` under a name of its own. Equal texts share one kernel (and Triton's cache).
"""
from __future__ import annotations

import hashlib
import linecache
from typing import Callable, Dict, Optional, Tuple

import triton
import triton.language as tl

_KERNELS: Dict[str, Callable] = {}
# kernel -> (source, name, helpers as (module, name)): how another process rebuilds it (.precompile)
_RECIPES: Dict[Callable, Tuple[str, str, Dict[str, Tuple[str, str]]]] = {}


def jit(source: str, name: str, **helpers) -> Callable:
    """The ``triton.jit`` kernel ``name`` defined by ``source`` (with ``triton``, ``tl``
    and ``helpers`` in scope), built once per distinct text."""
    if source not in _KERNELS:
        filename = f"<sparsekern generated {name} {hashlib.sha1(source.encode()).hexdigest()[:12]}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        scope = dict(triton=triton, tl=tl, **helpers)
        exec(compile(source, filename, "exec"), scope)
        _KERNELS[source] = scope[name]
        _RECIPES[scope[name]] = (source, name, {k: (v.fn.__module__, v.fn.__qualname__) for k, v in helpers.items()})
    return _KERNELS[source]


def recipe(kernel: Callable) -> Optional[Tuple[str, str, Dict[str, Tuple[str, str]]]]:
    """(source, name, helpers) of a kernel :func:`jit` made, None for any other."""
    return _RECIPES.get(kernel)


def literal(value: float, dtype_name: str) -> str:
    """A constant of ``dtype_name`` ('float32' / 'float64') holding ``value`` exactly
    (a bare Python float in a kernel is a float32)."""
    return f"tl.full((), {value!r}, tl.{dtype_name})"
