"""The back ends, as peers: their names, where each runs, which ops each implements, and
what ``backend="auto"`` picks (the table in ``auto.json``, per device type and op, that
the GPU benchmarks rewrite from their timings). Layers and the command line ask here;
nothing else names a back end."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List

import torch

OPS = ("linear", "element_linear", "channelwise_tp", "conv", "symmetric_contraction", "radial_mlp",
       "spherical_harmonics", "polynomial_cutoff", "gate", "reshape_irreps")
AUTO_TABLE = Path(__file__).with_name("auto.json")


def _triton_available(device: torch.device) -> bool:
    """A CUDA device, or CPU tensors under the interpreter (``TRITON_INTERPRET=1``, tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cuda_available(device: torch.device) -> bool:
    """A CUDA device and the compiled extension."""
    if device.type != "cuda":
        return False
    from .cuda import element_linear

    return element_linear.available()


@functools.lru_cache(maxsize=None)
def _cueq_available(device: torch.device) -> bool:
    """cuequivariance_torch imports, and on a GPU its ops package too: without it
    cuEquivariance runs its pure-torch method there, which ``auto`` must not pick over
    Triton on timings measured with cuEquivariance's kernels (on the CPU the pure-torch
    method is what runs)."""
    try:
        import cuequivariance_torch  # noqa: F401
    except Exception:  # absent, or a broken install
        return False
    return device.type != "cuda" or importlib.util.find_spec("cuequivariance_ops_torch") is not None


@dataclass(frozen=True)
class Backend:
    name: str
    ops: FrozenSet[str]  # the ops it implements; the others run on the torch reference
    available: Callable[[torch.device], bool]
    requires: str  # said when it is not available


BACKENDS: Dict[str, Backend] = {b.name: b for b in (
    Backend("torch", frozenset(OPS), lambda device: True, ""),
    Backend("triton", frozenset(OPS) - {"radial_mlp", "spherical_harmonics", "polynomial_cutoff", "gate",
                                       "reshape_irreps"},
            _triton_available, "a GPU, or TRITON_INTERPRET=1 on CPU"),
    Backend("cuda", frozenset({"element_linear"}), _cuda_available,
            "a GPU and the compiled extension sparsekern._C"),
    Backend("cueq", frozenset({"channelwise_tp", "conv", "symmetric_contraction"}), _cueq_available,
            "the package cuequivariance_torch, and cuequivariance-ops-torch on GPUs"),
)}
CHOICES = ("auto",) + tuple(BACKENDS)  # what the command line offers


@functools.lru_cache(maxsize=None)
def _auto_table() -> Dict[str, Dict[str, List[str]]]:
    return json.loads(AUTO_TABLE.read_text())


def update_auto_table(device_type: str, orders: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """Set what ``auto`` tries, in order, for each op in ``orders`` on ``device_type``
    (from a benchmark's timings); torch stays the last resort. Returns the new rows."""
    from ..files import atomic_write

    table = json.loads(AUTO_TABLE.read_text())
    rows = table.setdefault(device_type, {})
    for op, order in orders.items():
        if op not in OPS or any(name not in BACKENDS or op not in BACKENDS[name].ops for name in order):
            raise ValueError(f"auto table: {op!r} cannot run on {order}")
        rows[op] = list(order) + ([] if "torch" in order else ["torch"])
    atomic_write(AUTO_TABLE, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=1) + "\n"))
    _auto_table.cache_clear()
    return rows


def check(backend: str, device: torch.device) -> None:
    """A clear error for an unknown back end, or one this device cannot run."""
    if backend == "auto":
        return
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {CHOICES}")
    if not BACKENDS[backend].available(torch.device(device)):
        raise RuntimeError(f"backend {backend!r} is not available on {device} (it needs "
                           f"{BACKENDS[backend].requires}; torch is always available)")


def resolve(backend: str, op: str, device: torch.device) -> str:
    """The back end ``op`` runs on. ``auto``: the first available one in the auto table
    for the device type (torch where the table is silent); an explicit name must be
    available, and an op it lacks runs on the torch reference."""
    device = torch.device(device)
    if backend == "auto":
        order = _auto_table().get(device.type, {}).get(op, ["torch"])
        return next(name for name in order + ["torch"] if BACKENDS[name].available(device))
    check(backend, device)
    return backend if op in BACKENDS[backend].ops else "torch"


def implementation(op: str, backend: str) -> Callable:
    """The function computing ``op`` on ``backend`` (its package, whose ``OPS`` maps op
    names to functions, is imported on first use)."""
    fn = _IMPLEMENTATIONS.get((op, backend))
    if fn is None:
        if op not in BACKENDS[backend].ops:
            raise ValueError(f"back end {backend!r} does not implement {op!r}; it implements "
                             f"{sorted(BACKENDS[backend].ops)}")
        fn = _IMPLEMENTATIONS[op, backend] = importlib.import_module(f"{__package__}.{backend}").OPS[op]
    return fn


_IMPLEMENTATIONS: Dict[tuple, Callable] = {}
