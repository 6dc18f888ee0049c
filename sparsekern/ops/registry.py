"""The back ends, as peers: their names, where each runs, which ops each implements, and
what ``backend="auto"`` picks (the table in ``auto.json``, per device type and op, that
the GPU benchmarks rewrite from their timings). Layers and the command line ask here;
nothing else names a back end."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple, Union

import torch

OPS = ("linear", "element_linear", "channelwise_tp", "conv", "symmetric_contraction", "radial_mlp",
       "spherical_harmonics", "polynomial_cutoff", "gate", "reshape_irreps")
AUTO_TABLE = Path(__file__).with_name("auto.json")
# ops whose first operand has a row per atom: their auto rows may hold an order per number
# of atoms measured ({"300": [...], "5000": [...]}), the nearest one (in log) chosen per call
SIZED_OPS = ("conv", "symmetric_contraction", "linear", "element_linear")


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
    """A CUDA device, the compiled extension, and Triton (the weight gradient is Triton's)."""
    if device.type != "cuda" or not _triton_available(device):
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
            "a GPU, the compiled extension sparsekern._C and Triton"),
    Backend("cueq", frozenset({"channelwise_tp", "conv", "symmetric_contraction"}), _cueq_available,
            "the package cuequivariance_torch, and cuequivariance-ops-torch on GPUs"),
)}
CHOICES = ("auto",) + tuple(BACKENDS)  # what the command line offers


Order = Union[List[str], Dict[str, List[str]]]  # an auto row: one order, or one per number of atoms


@functools.lru_cache(maxsize=None)
def _auto_table() -> Dict[str, Dict[str, Order]]:
    return json.loads(AUTO_TABLE.read_text())


def update_auto_table(device_type: str, orders: Dict[str, Order], source: str = "") -> Dict[str, Order]:
    """Set what ``auto`` tries, in order, for each op in ``orders`` on ``device_type``
    (from a benchmark's timings; for a ``SIZED_OPS`` op, one order per number of atoms
    measured); torch stays the last resort, and a back end the old order lists but the
    run did not time keeps its place (the suite does not time the CUDA element linear).
    ``source`` (the run) heads the list of runs under "rewritten". Returns the new rows."""
    from ..files import atomic_write

    def checked(op: str, order: List[str], old) -> List[str]:
        if op not in OPS or any(name not in BACKENDS or op not in BACKENDS[name].ops for name in order):
            raise ValueError(f"auto table: {op!r} cannot run on {order}")
        order = list(order)
        for i, name in enumerate(old if isinstance(old, list) else []):
            if name not in order and name != "torch":
                order.insert(min(i, len(order)), name)
        return order + ([] if "torch" in order else ["torch"])

    table = json.loads(AUTO_TABLE.read_text())
    rows = table.setdefault(device_type, {})
    for op, order in orders.items():
        if isinstance(order, dict) and op not in SIZED_OPS:
            raise ValueError(f"auto table: {op!r} takes one order, not one per number of atoms")
        old = rows.get(op)
        rows[op] = ({str(int(atoms)): checked(op, o, _replaced(old, int(atoms))) for atoms, o in order.items()}
                    if isinstance(order, dict) else checked(op, order, _replaced(old, None)))
    if source:
        runs = table.setdefault("rewritten", {})
        runs[device_type] = [source] + runs.get(device_type, [])
    atomic_write(AUTO_TABLE, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=1) + "\n"))
    _auto_table.cache_clear()
    return rows


def _replaced(old: Optional[Order], atoms: Optional[int]) -> Optional[List[str]]:
    """The old order a new one at ``atoms`` (None: one order for every size) replaces:
    the old row's nearest size's (in log), its largest's for one order."""
    if not isinstance(old, dict):
        return old
    sizes = [int(a) for a in old]
    return old[str(max(sizes) if atoms is None else min(sizes, key=lambda a: abs(math.log(a / atoms))))]


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
    for the device type (torch where the table is silent; where it has an order per
    number of atoms, the largest's: ``by_atoms`` gives them all); an explicit name must be
    available, and an op it lacks runs on the torch reference."""
    device = torch.device(device)
    if backend == "auto":
        row = _auto_table().get(device.type, {}).get(op, ["torch"])
        return _first_available(row[max(row, key=int)] if isinstance(row, dict) else row, device)
    check(backend, device)
    return backend if op in BACKENDS[backend].ops else "torch"


def per_device(backend: str) -> bool:
    """Whether what ``backend`` runs depends on the device: ``auto``, whose table is per device type."""
    return backend == "auto"


def by_atoms(backend: str, op: str, device: torch.device) -> Optional["Sized"]:
    """What ``auto`` runs ``op`` on by the call's number of atoms, where the auto table
    has an order per number measured; None where the choice does not depend on it."""
    device = torch.device(device)
    row = _auto_table().get(device.type, {}).get(op) if backend == "auto" and op in SIZED_OPS else None
    if not isinstance(row, dict):
        return None
    sizes = sorted(int(atoms) for atoms in row)
    names = [_first_available(row[str(atoms)], device) for atoms in sizes]
    if len(set(names)) == 1:  # the same whatever the size (a back end missing here)
        return None
    return Sized(tuple(math.sqrt(a * b) for a, b in zip(sizes, sizes[1:])), tuple(names))


def _first_available(order: List[str], device: torch.device) -> str:
    return next(name for name in order + ["torch"] if BACKENDS[name].available(device))


@dataclass(frozen=True)
class Sized:
    """A back end per range of atoms: ``names[i]`` up to ``bounds[i]`` (the geometric
    mean of two sizes measured: the nearer one's choice, in log), the last above."""
    bounds: Tuple[float, ...]
    names: Tuple[str, ...]

    def __call__(self, atoms: int) -> str:
        return next((name for bound, name in zip(self.bounds, self.names) if atoms <= bound), self.names[-1])

    def __str__(self) -> str:
        parts = [f"{name} up to {bound:,.0f} atoms" for bound, name in zip(self.bounds, self.names)]
        return "auto: " + ", ".join(parts + [f"{self.names[-1]} above"])


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
