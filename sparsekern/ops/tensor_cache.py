"""What the layers derive from a graph's tensors (the edges' orderings from edge_index,
the nodes' elements and their tiles from node_attrs), kept with that tensor: built by the
first layer that needs it and reused by every later layer and pass of the same graph,
so that a model's forward and backward plan each graph once. An entry goes with its
tensor (a weak key) and is dropped when the tensor changes in place (its version). A
write that bypasses the version (through ``.data``, or a numpy array the tensor shares
memory with) is not seen: a driver that refills one neighbour-list buffer must write it
with torch's in-place ops (``edge_index.copy_(new)``), or pass a new tensor.
Values must not reference their key tensor, or the entry would keep it alive.
:func:`derived` keeps, the same way, what is derived from frozen weights."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_CACHES = WeakTensorKeyDictionary()  # tensor -> (its version, {key: value})

T = TypeVar("T")


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream: its kernels are
    recorded, not run, and each replay runs them again on what was copied into the
    captured inputs since."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _tracked(tensor: torch.Tensor) -> dict:
    version, cache = _CACHES.get(tensor, (None, None))
    if version != tensor._version:
        cache = {}
        _CACHES[tensor] = (tensor._version, cache)
    return cache


def cache_of(tensor: torch.Tensor) -> dict:
    """The cache of ``tensor``: a fresh dict for a tensor that cannot be tracked (an
    inference-mode tensor has no version counter; under torch.compile's tracing a fake
    one has no identity worth keeping), and while a CUDA graph is captured: what is
    derived from a graph's tensors must then be computed inside the graph, or a replay
    on new inputs (copied into the same tensors, at whatever version) would reuse the
    orderings of the inputs seen before the capture."""
    if torch.compiler.is_compiling() or tensor.is_inference() or capturing():  # (is_inference after Dynamo's check)
        return {}
    return _tracked(tensor)


def cached(tensor: torch.Tensor, key, build: Callable[[], T]) -> T:
    """``build()``, once per ``tensor`` (and version) and ``key``; built outside inference
    mode (an inference tensor kept for later calls could not be saved for their backward)."""
    cache = cache_of(tensor)
    if key not in cache:
        with torch.inference_mode(False):
            cache[key] = build()
    return cache[key]


def _stamp(tensor: torch.Tensor) -> tuple:
    """What tells a tensor's values changed: its version (in-place ops), its storage, dtype
    and device (``.data = ...``, ``module.to()``/``.double()``, which keep the version).
    In-place writes through ``.data`` (``p.data.copy_``) change none of them: a frozen
    weight written so must be written in place (``p.copy_`` under no_grad) instead."""
    return tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device


def derived(sources: Sequence[torch.Tensor], key, build: Callable[[], T]) -> T:
    """``build()`` of ``sources`` (first one the cache's key), reused while each source is
    the same tensor with the same ``_stamp`` and none needs a gradient: what inference
    derives from frozen weights (a delta's value, a folded weight; MACE's calculator
    freezes its model). Built afresh, not cached, for weights that train, whatever the
    grad mode: under no_grad they are still written by the optimizer, or through
    ``.data`` (torch_ema's averages for validation), which no version counts. A CUDA graph's
    capture reuses what was built before it (and holds it: :func:`held`; a capture is
    made anew once the weights change, ``integrations.cuda_graphs.State``) but keeps
    nothing it builds: that lives in the graph's memory, written only by its replays."""
    if any(s.requires_grad for s in sources):
        return build()
    if torch.compiler.is_compiling() or any(s.is_inference() for s in sources):
        return build()
    cache = _tracked(sources[0])
    stamp = [(weakref.ref(s), _stamp(s)) for s in sources]
    hit = cache.get(key)
    if hit is None or len(hit[0]) != len(stamp) or any(
            ref() is not s or seen != _stamp(s) for (ref, seen), s in zip(hit[0], sources)):
        if capturing():
            return build()
        with torch.inference_mode(False):  # (kept for calls that may record autograd)
            hit = cache[key] = (stamp, build())
    if capturing() and _HELD:
        _HELD[-1].append(hit[1])
    return hit[1]


_HELD: list = []  # per capture in progress: the cached values it reads


@contextmanager
def held() -> Iterator[list]:
    """The cached values :func:`derived` hands to a CUDA graph's capture inside the block,
    for the graph to keep: it reads their memory at every replay, and a cache entry
    replaced later (the weights changed and evaluated again) would free it under it."""
    _HELD.append([])
    try:
        yield _HELD[-1]
    finally:
        _HELD.pop()
