"""A MACE model whose inference calls replay CUDA graphs: for molecular dynamics.

Eager, a patched model waits on its host: the second GPU run measured energy+forces of
5,120 atoms at 36.8 ms eager and 9.2 ms replayed from a CUDA graph (benchmarks/NOTES.md),
and the smaller the system the larger the share. A graph replays fixed shapes; an MD
driver calls with the same atoms and a few more or fewer edges each step. So each call
is padded to a capacity: two padding atoms in a graph of their own, 2 r_max apart
(padding edges join them: beyond the cutoff, zero weights and zero messages, nothing
reaches the real atoms or the real graphs' energies, forces and stresses), and edges
up to the capacity. One graph per (atoms, graphs, edge capacity, dtype, flags); a call
with more edges than the capacity captures a new one with ``headroom`` to spare.

Training (or a parameter that needs a gradient) runs the model eagerly, and so does a
call whose capture fails (said once in a warning); every call on the CPU runs padded,
eagerly (how the tests check the padding)."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Tuple, TypeVar

import torch

_NODE_KEYS = ("positions", "node_attrs", "batch")
_EDGE_KEYS = ("shifts", "unit_shifts")
_NONE, _EAGER = object(), object()  # no graph yet; a call that could not be captured
T = TypeVar("T")


class GraphedMACE(torch.nn.Module):
    """``model`` (a MACE model, patched or not) called through padded CUDA graphs; its
    attributes (``r_max``, ``atomic_numbers``, ``heads``...) read through, so MACE's
    calculator takes it: ``MACECalculator(models=GraphedMACE(model), device="cuda")``."""

    def __init__(self, model: torch.nn.Module, headroom: float = 0.1) -> None:
        super().__init__()
        if not headroom >= 0:
            raise ValueError(f"headroom must be >= 0, got {headroom}")
        self.model, self.headroom = model, headroom
        self._graphs: Dict[Tuple, "_Captured"] = {}
        self._pool = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, data: Dict[str, torch.Tensor], training: bool = False, **flags):
        if training or (torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())):
            return self.model(data, training=training, **flags)
        missing = [k for k in ("edge_index", "ptr", "cell", *_NODE_KEYS, *_EDGE_KEYS) if k not in data]
        if missing:
            raise ValueError(f"GraphedMACE: the batch lacks {missing} (a MACE AtomicData batch has them)")
        n, g, e = data["positions"].shape[0], data["ptr"].shape[0] - 1, data["edge_index"].shape[1]
        if data["positions"].device.type != "cuda":
            return _real(self.model(pad(data, _capacity(e, self.headroom), float(self.model.r_max)), **flags), n, g, e)
        key = (n, g, data["positions"].dtype, tuple(sorted(flags.items())))
        captured = self._graphs.get(key, _NONE)
        if captured is _EAGER:
            return self.model(data, **flags)
        if captured is _NONE or captured.edges < e:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                captured = self._graphs[key] = _Captured(self.model, data, _capacity(e, self.headroom), flags,
                                                         self._pool)
            except Exception as exc:  # noqa: BLE001 (a model whose call cannot be captured: eager, as without this)
                self._graphs[key] = _EAGER
                warnings.warn(f"GraphedMACE: this call cannot be captured in a CUDA graph ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); it runs eagerly", stacklevel=2)
                return self.model(data, **flags)
        return captured(data)


def _capacity(e: int, headroom: float) -> int:
    """Edges a graph is captured for: ``e`` with headroom, a multiple of 64."""
    return 64 * math.ceil(e * (1 + headroom) / 64) if e else 64


def pad(data: Dict[str, torch.Tensor], edges: int, r_max: float) -> Dict[str, torch.Tensor]:
    """The MACE batch ``data`` with two padding atoms (element 0 of the model's table) in
    a graph of their own, 2 ``r_max`` apart, and padding edges between them up to
    ``edges`` edges; keys other than the model's inputs are left out."""
    pos, ptr = data["positions"], data["ptr"]
    n, g, e = pos.shape[0], ptr.shape[0] - 1, data["edge_index"].shape[1]
    if edges < e:
        raise ValueError(f"pad: {e} edges do not fit a capacity of {edges}")
    out = {}
    two = pos.new_zeros(2, 3)
    two[1, 0] = 2 * r_max
    out["positions"] = torch.cat([pos, two])
    attrs = data["node_attrs"].new_zeros(2, data["node_attrs"].shape[1])
    attrs[:, 0] = 1
    out["node_attrs"] = torch.cat([data["node_attrs"], attrs])
    out["batch"] = torch.cat([data["batch"], data["batch"].new_full((2,), g)])
    out["ptr"] = torch.cat([ptr, ptr.new_full((1,), n + 2)])
    out["cell"] = torch.cat([data["cell"], 4 * r_max * torch.eye(3, dtype=data["cell"].dtype, device=pos.device)])
    if "head" in data:
        out["head"] = torch.cat([data["head"], data["head"][:1] * 0])
    k = edges - e
    odd = torch.arange(k, device=pos.device, dtype=data["edge_index"].dtype) % 2
    senders = n + odd  # n -> n + 1, n + 1 -> n, ...
    out["edge_index"] = torch.cat([data["edge_index"], torch.stack([senders, 2 * n + 1 - senders])], 1)
    for key in _EDGE_KEYS:
        out[key] = torch.cat([data[key], data[key].new_zeros(k, 3)])
    return out


_PER_GRAPH = {"energy", "interaction_energy", "stress", "virials", "displacement", "dipole", "polarizability"}
_PER_NODE = {"node_energy", "forces", "node_feats", "atomic_stresses", "atomic_virials"}


def _real(out: Dict[str, torch.Tensor], n: int, g: int, e: int) -> Dict[str, torch.Tensor]:
    """The model's outputs for the real graphs, atoms and edges (cloned: a replay
    overwrites them); an output MACE's names do not place is placed by its length."""
    real = {}
    for key, value in out.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            real[key] = value
            continue
        rows = g if key in _PER_GRAPH else n if key in _PER_NODE else {g + 1: g, n + 2: n}.get(value.shape[0], e)
        real[key] = value[:rows].clone()
    return real


def capture(fn: Callable[[], T], pool=None, warmups: int = 2) -> Tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` captured in a CUDA graph, and its output (rewritten by each replay): run
    ``warmups`` times on a side stream first (kernels compiled, workspaces set up: nothing
    of that captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class _Captured:
    """One CUDA graph of the model on padded inputs of fixed shapes."""

    def __init__(self, model, data, edges: int, flags: dict, pool) -> None:
        self.edges, self.n, self.g = edges, data["positions"].shape[0], data["ptr"].shape[0] - 1
        self.static = pad(data, edges, float(model.r_max))
        self.filler = {k: v.clone() for k, v in self.static.items() if k in ("edge_index", *_EDGE_KEYS)}
        self.graph, self.out = capture(lambda: model(dict(self.static), **flags), pool)

    @torch.no_grad()
    def __call__(self, data):
        e = data["edge_index"].shape[1]
        for key in ("positions", "node_attrs", "batch"):
            self.static[key][:self.n].copy_(data[key])
        self.static["cell"][:3 * self.g].copy_(data["cell"])
        self.static["ptr"][:self.g + 1].copy_(data["ptr"])
        if "head" in data:
            self.static["head"][:self.g].copy_(data["head"])
        self.static["edge_index"][:, :e].copy_(data["edge_index"])
        self.static["edge_index"][:, e:].copy_(self.filler["edge_index"][:, e:])
        for key in _EDGE_KEYS:
            self.static[key][:e].copy_(data[key])
            self.static[key][e:].copy_(self.filler[key][e:])
        self.graph.replay()
        return _real(self.out, self.n, self.g, e)
