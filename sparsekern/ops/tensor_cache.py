"""What the layers derive from a graph's tensors (the edges' orderings from edge_index,
the nodes' elements and their tiles from node_attrs), kept with that tensor: built by the
first layer that needs it and reused by every later layer and pass of the same graph,
so that a model's forward and backward plan each graph once. An entry goes with its
tensor (a weak key) and is dropped when the tensor changes in place (its version).
Values must not reference their key tensor, or the entry would keep it alive.
:func:`derived` keeps, the same way, what is derived from frozen weights."""

from __future__ import annotations

import weakref
from typing import Callable, Sequence, TypeVar

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_CACHES = WeakTensorKeyDictionary()  # tensor -> (its version, {key: value})

T = TypeVar("T")


def cache_of(tensor: torch.Tensor) -> dict:
    """The cache of ``tensor``: a fresh dict for a tensor that cannot be tracked (an
    inference-mode tensor has no version counter; under torch.compile's tracing a fake
    one has no identity worth keeping)."""
    if torch.compiler.is_compiling() or tensor.is_inference():  # (first: Dynamo cannot trace is_inference)
        return {}
    version, cache = _CACHES.get(tensor, (None, None))
    if version != tensor._version:
        cache = {}
        _CACHES[tensor] = (tensor._version, cache)
    return cache


def cached(tensor: torch.Tensor, key, build: Callable[[], T]) -> T:
    """``build()``, once per ``tensor`` (and version) and ``key``."""
    cache = cache_of(tensor)
    if key not in cache:
        cache[key] = build()
    return cache[key]


def derived(sources: Sequence[torch.Tensor], key, build: Callable[[], T]) -> T:
    """``build()`` of ``sources`` (first one the cache's key), reused while each source is
    the same tensor at the same version and none needs a gradient: what inference derives
    from frozen weights (a delta's value, a folded weight; MACE's calculator freezes its
    model). Built afresh, not cached, where autograd would record it."""
    if torch.is_grad_enabled() and any(s.requires_grad for s in sources):
        return build()
    cache = cache_of(sources[0])
    stamp = [(weakref.ref(s), s._version) for s in sources[1:]]
    hit = cache.get(key)
    if hit is None or len(hit[0]) != len(stamp) or any(
            ref() is not s or seen != s._version for (ref, seen), s in zip(hit[0], sources[1:])):
        hit = cache[key] = (stamp, build())
    return hit[1]
