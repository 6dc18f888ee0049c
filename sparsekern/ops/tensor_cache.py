"""What the layers derive from a graph's tensors (the edges' orderings from edge_index,
the nodes' elements and their tiles from node_attrs), kept with that tensor: built by the
first layer that needs it and reused by every later layer and pass of the same graph,
so that a model's forward and backward plan each graph once. An entry goes with its
tensor (a weak key) and is dropped when the tensor changes in place (its version).
Values must not reference their key tensor, or the entry would keep it alive."""

from __future__ import annotations

from typing import Callable, TypeVar

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
