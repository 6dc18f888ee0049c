"""What every sparsekern layer shares: a back end, constants cached per device and
dtype, input checks, and the way back to the module it replaced."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda")


@dataclass(frozen=True)
class WeightGroup:
    """One block of path weights inside a parameter, seen as (G, R, C) matrices:
    G elements (1 where the weight is shared), R x C the path's weight matrix.
    Sparse deltas, their tiles, statistics and adapters are all defined on groups."""

    param: str  # parameter name inside the layer
    offset: int  # start in the flattened parameter
    shape: Tuple[int, int, int]  # (G, R, C)
    layout: str  # memory order of the flat segment: "grc", or "rgc" for e3nn's element-indexed products
    label: str  # e.g. "64x1o->64x1o", "0e nu=3", "radial layer 3"
    l: Optional[int]  # irrep order of the path; None for radial MLPs
    per_element: bool

    @property
    def numel(self) -> int:
        g, r, c = self.shape
        return g * r * c

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The (G, R, C) view of this group's segment of a flattened parameter."""
        g, r, c = self.shape
        seg = flat.narrow(0, self.offset, self.numel)
        return seg.view(g, r, c) if self.layout == "grc" else seg.view(r, g, c).transpose(0, 1)

    def flatten(self, grc: torch.Tensor) -> torch.Tensor:
        """Inverse of ``view``: the segment in memory order, flattened."""
        return (grc if self.layout == "grc" else grc.transpose(0, 1)).reshape(-1)


class SparsekernLayer(torch.nn.Module):
    """Base class. Subclasses keep the parameter names and shapes of the module they
    replace, so optimizers, ``named_parameters`` and checkpoints see no change."""

    implemented_backends = ("torch",)

    def __init__(self) -> None:
        super().__init__()
        self.backend = "torch"
        # Constants (Clebsch-Gordan blocks, index tables) live outside the state dict:
        # they are rebuilt for each (device, dtype) on first use.
        self._const_cache: Dict[Tuple[str, torch.device, torch.dtype], object] = {}
        # The module this layer replaced, kept unregistered (its parameters are ours).
        self._replaced = None

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module) -> Optional[str]:
        """Why ``module`` cannot be replaced by this layer, or None."""
        return None

    @classmethod
    def from_e3nn(cls, module: torch.nn.Module):
        """The layer that replaces ``module`` (an e3nn or MACE module), sharing its parameters."""
        reason = cls.unsupported_reason(module)
        if reason:
            raise ValueError(f"cannot replace {module}: {reason}")
        return cls._new_from(module)

    from_mace = from_e3nn

    @classmethod
    def _new_from(cls, module: torch.nn.Module):
        """Build from an existing module, sharing its Parameter objects."""
        self = cls.__new__(cls)
        SparsekernLayer.__init__(self)
        self._init_from(module)
        return self

    def _init_from(self, module: torch.nn.Module) -> None:
        raise NotImplementedError

    def weight_groups(self) -> List[WeightGroup]:
        """The path weights of this layer that a sparse delta may change."""
        return []

    def effective(self, name: str) -> torch.Tensor:
        """Parameter ``name`` with its sparse delta applied (W0 + dW), if one is attached."""
        base = _get_by_path(self, name)
        deltas = self._modules.get("deltas")
        delta = deltas._modules.get(name.replace(".", "__")) if deltas is not None else None
        if delta is None or delta.merged:
            return base
        return base + delta().view_as(base)

    def set_backend(self, backend: str) -> "SparsekernLayer":
        if backend not in self.implemented_backends:
            raise ValueError(f"{type(self).__name__} has no {backend!r} back end; "
                             f"it implements {self.implemented_backends}")
        self.backend = backend
        return self

    def _const(self, name: str, like: torch.Tensor, build: Callable[[], object]):
        key = (name, like.device, like.dtype)
        value = self._const_cache.get(key)
        if value is None:
            value = _to(build(), like)
            self._const_cache[key] = value
        return value

    def _check_features(self, x: torch.Tensor, dim: int, what: str) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"{type(self).__name__}: {what} must be a tensor, got {type(x).__name__}")
        if x.shape[-1] != dim:
            raise ValueError(
                f"{type(self).__name__}: {what} has last dimension {x.shape[-1]}, "
                f"but its irreps {self._irreps_of(what)} have dimension {dim}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: {what} must be floating point, got {x.dtype}")

    def _irreps_of(self, what: str) -> str:
        return str(getattr(self, {"x": "irreps_in", "x1": "irreps_in1", "x2": "irreps_in2"}.get(what, "irreps_in"), "?"))

    def _check_same(self, ref: torch.Tensor, other: torch.Tensor, what: str) -> None:
        if other.dtype != ref.dtype:
            raise TypeError(f"{type(self).__name__}: {what} has dtype {other.dtype}, expected {ref.dtype}")
        if other.device != ref.device:
            raise ValueError(f"{type(self).__name__}: {what} is on {other.device}, expected {ref.device}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_const_cache"] = {}
        return state

    def extra_repr(self) -> str:
        return f"backend={self.backend}"

    def to_replaced(self) -> torch.nn.Module:
        """The original module, holding this layer's current parameters."""
        if self._replaced is None:
            raise RuntimeError(f"{type(self).__name__} was not built from an existing module")
        orig = self._replaced
        for name, param in self.named_parameters():
            if not name.startswith("deltas."):
                _set_by_path(orig, name, param)
        ref = next(self.parameters(), None)
        if ref is not None:
            orig.to(device=ref.device)
            _match_float_dtype(orig, ref.dtype)
        return orig


def split_segments(t: torch.Tensor, segments, dim: int = -1):
    """The pieces of ``t`` at (offset, size) segments, sorted by offset, by one split:
    its backward is one concatenation, where slicing zero-fills a full-size gradient
    per piece."""
    sizes, keep, pos = [], [], 0
    for off, size in segments:
        if off > pos:
            sizes.append(off - pos)
            keep.append(False)
        sizes.append(size)
        keep.append(True)
        pos = off + size
    if pos < t.shape[dim]:
        sizes.append(t.shape[dim] - pos)
        keep.append(False)
    return [piece for piece, k in zip(t.split(sizes, dim), keep) if k]


def _to(value, like: torch.Tensor):
    if torch.is_tensor(value):
        return value.to(device=like.device, dtype=like.dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(_to(v, like) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, like) for v in value)
    return value


def _get_by_path(module: torch.nn.Module, path: str) -> torch.Tensor:
    """Like get_parameter, but also sees tensors that torch.func.functional_call swapped in."""
    for p in path.split("."):
        module = module[int(p)] if p.isdigit() else getattr(module, p)
    return module


def _set_by_path(module: torch.nn.Module, path: str, param: torch.nn.Parameter) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        module = getattr(module, p) if not p.isdigit() else module[int(p)]
    if isinstance(module, torch.nn.ParameterList):
        module[int(leaf)] = param
    else:
        setattr(module, leaf, param)


def _match_float_dtype(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Bring floating buffers (e.g. Clebsch-Gordan constants) to the parameters' dtype."""
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                sub._buffers[name] = buf.to(dtype)
