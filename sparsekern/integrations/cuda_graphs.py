"""A model's inference replayed from CUDA graphs, for molecular dynamics: what the
families' graphed models share (``mace/graphed.py``, ``sevennet/graphed.py``).

Eager, a patched model waits on its host: the second GPU run measured energy+forces of
5,120 atoms at 36.8 ms eager and 9.2 ms replayed from a CUDA graph (benchmarks/NOTES.md),
and the smaller the system the larger the share. A graph replays fixed shapes; an MD
driver calls with the same atoms and a few more or fewer edges each step. So each family
pads a call to an edge capacity (padding atoms in a graph of their own, padding edges
between them that reach nothing real) and keeps one graph per set of shapes and flags;
a call with more edges than the capacity captures a new one with ``headroom`` to spare,
and so does a call after the model's weights changed (:class:`State`: an adapter set,
weights edited in place)."""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Callable, Dict, Hashable, Optional, Tuple, TypeVar

import torch

from ..ops import tensor_cache

T = TypeVar("T")
_EAGER = object()  # a call that could not be captured


def replayable(device: torch.device) -> bool:
    """Whether calls on ``device`` replay graphs (CUDA); elsewhere they run padded, eagerly."""
    return device.type == "cuda"


def capacity(size: int, headroom: float) -> int:
    """Edges (or atoms) a graph is captured for: ``size`` with headroom, a multiple of 64."""
    return 64 * math.ceil(size * (1 + headroom) / 64) if size else 64


def capture(fn: Callable[[], T], pool=None, warmups: int = 2) -> Tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` captured in a CUDA graph, and its output (rewritten by each replay): run
    ``warmups`` times on a side stream first (kernels compiled, workspaces set up: nothing
    of that captured). The graph keeps the cached values it reads (``tensor_cache.held``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with tensor_cache.held() as graph.held, torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class Replays:
    """The captured calls of one model, by key (shapes, dtype, flags), sharing one memory
    pool. ``owner`` names the model in the warning of a call that cannot be captured."""

    def __init__(self, owner: str, headroom: float) -> None:
        if not headroom >= 0:
            raise ValueError(f"headroom must be >= 0, got {headroom}")
        self.owner, self.headroom = owner, headroom
        self.graphs: Dict[Hashable, object] = {}
        self._states: Dict[Hashable, Optional[State]] = {}
        self._pool = None

    def get(self, key: Hashable, sizes: Tuple[int, ...], build: Callable[[Tuple[int, ...], object], T],
            state: Optional["State"] = None) -> Optional[T]:
        """The capture for ``key`` that holds ``sizes`` (edges; or atoms and edges: each at
        most its capacity, the capture's ``sizes``) and was made at ``state`` (the model's
        :class:`State`, where its frozen weights matter): the one kept, else
        ``build(capacities, pool)``'s (kept); None where that call cannot be captured
        (then run it eagerly: said once in a warning)."""
        captured = self.graphs.get(key)
        if captured is _EAGER:
            return None
        if captured is None or self._states.get(key) != state or any(
                held < size for held, size in zip(captured.sizes, sizes)):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                capacities = tuple(capacity(size, self.headroom) for size in sizes)
                captured = self.graphs[key] = build(capacities, self._pool)
                self._states[key] = state
            except Exception as exc:  # noqa: BLE001 (a model whose call cannot be captured: eager, as without this)
                self.graphs[key] = _EAGER
                first = str(exc).splitlines()[0] if str(exc) else ""
                warnings.warn(f"{self.owner}: this call cannot be captured in a CUDA graph ({type(exc).__name__}: "
                              f"{first}); it runs eagerly", stacklevel=3)
                return None
        return captured


class State:
    """A model's parameters and buffers, each with its version. A capture reads what was
    derived from frozen weights and cached with their versions (``tensor_cache.derived``:
    a delta's values, folded weights); replayed after they change (an optimizer step, an
    adapter swapped in), it would compute with the old values: such a capture is made
    anew (``Replays.get``). Holds the tensors, so that none is compared by a reused id."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = tuple(itertools.chain(model.parameters(), model.buffers()))
        self.versions = tuple(t._version for t in self.tensors)

    def __eq__(self, other) -> bool:
        return (isinstance(other, State) and self.versions == other.versions and len(self.tensors) == len(other.tensors)
                and all(a is b for a, b in zip(self.tensors, other.tensors)))

    __hash__ = None


def padding_atoms(atoms: int, edges: int, capacity: int) -> int:
    """The padding atoms of a call of ``atoms`` atoms and ``edges`` edges padded to
    ``capacity`` edges: two, or as many pairs as give each padding atom about four times
    the real atoms' mean degree (a few per cent more atoms). A program of the conv's
    kernels loops over the largest degree among its atoms: with every padding edge on two
    atoms (as before), one program looped over half of them where the others looped over
    tens of edges. One more where the padded atoms would number the padded edges: outputs
    not known by name are told apart by their lengths."""
    mean = max(edges / max(atoms, 1), 1.0)
    padding = max(2, 2 * math.ceil((capacity - edges) / (8 * mean)))
    return padding + (atoms + padding == capacity)


def padding_positions(atoms: int, distance: float, like: torch.Tensor) -> torch.Tensor:
    """The positions of ``atoms`` padding atoms, as ``like``'s dtype and device: the two of
    each pair of :func:`padding_edges` ``distance`` apart along x, a last unpaired one at
    the origin."""
    positions = like.new_zeros(atoms, 3)
    positions[1:2 * (atoms // 2):2, 0] = distance
    return positions


def padding_edges(first: int, atoms: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """``k`` edges (senders; receivers) within the pairs (``first`` + 2j, ``first`` + 2j + 1)
    of ``atoms`` padding atoms, edge t in pair t mod pairs, in turn each way: each padding
    atom sends and receives about k / atoms of them (as ``like``'s dtype and device)."""
    pairs = atoms // 2
    if pairs == 0:
        raise ValueError(f"padding edges need two padding atoms at least, got {atoms}")
    t = torch.arange(k, device=like.device, dtype=like.dtype)
    way = (t // pairs) % 2
    senders = first + 2 * (t % pairs) + way
    return torch.stack([senders, senders + 1 - 2 * way])


class Captured:
    """``run`` captured once on ``pad(inputs, edges)`` (the call's inputs padded to
    ``edges`` edges: ``static``). A later call copies its inputs into their leading rows
    (the padding after them, atoms and graphs, stays; an input the call does not give,
    fixed for the key it was captured for, stays as captured), refills the edge keys' rows after
    its edges with padding edges (``edge_dims``: each edge key and the dimension its
    edges run along; padding from ``pad`` of the inputs without edges, so that no real
    edge of an earlier call is left there), replays, and returns the output (rewritten
    by the next replay)."""

    def __init__(self, run: Callable[[dict], T], pad: Callable[[dict, int], Dict[str, torch.Tensor]],
                 inputs: Dict[str, torch.Tensor], edges: int, edge_dims: Dict[str, int], pool=None) -> None:
        self.static, self.edge_dims, self.edges, self.sizes = pad(inputs, edges), edge_dims, edges, (edges,)
        edgeless = {k: v.narrow(edge_dims[k], 0, 0) if k in edge_dims else v for k, v in inputs.items()}
        self.filler = {k: v for k, v in pad(edgeless, edges).items() if k in edge_dims}
        self.graph, self.out = capture(lambda: run(dict(self.static)), pool)

    @torch.no_grad()
    def __call__(self, data) -> T:
        for key, buffer in self.static.items():
            if key not in data:
                continue
            dim = self.edge_dims.get(key, 0)
            rows = data[key].shape[dim]
            buffer.narrow(dim, 0, rows).copy_(data[key])
            if key in self.edge_dims:
                rest = buffer.shape[dim] - rows
                buffer.narrow(dim, rows, rest).copy_(self.filler[key].narrow(dim, rows, rest))
        self.graph.replay()
        return self.out
