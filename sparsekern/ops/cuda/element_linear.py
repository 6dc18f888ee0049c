"""The element-indexed linear on the compiled extension ``sparsekern._C`` (csrc/), as a
differentiable op.

Importable everywhere: without the extension (CPU-only install, no nvcc at build time) or
without a GPU, :func:`available` returns False and the registry never picks this back end.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from e3nn import o3

from ...delta_slot import effective
from ...paths import OutputSlots, Path
from ..descriptors import LinearDesc
from ..grads import needed, track

try:
    from ... import _C
except (ImportError, OSError) as exc:  # not built, or built against an unloadable runtime
    _C = None
    _IMPORT_ERROR: BaseException | None = exc
else:
    _IMPORT_ERROR = None

_FLOATS = (torch.float32, torch.float64)


def available() -> bool:
    """True when the extension imports and torch sees a CUDA device."""
    return _C is not None and torch.cuda.is_available()


def _check(x, weight, species) -> None:
    for name, t in (("x", x), ("weight", weight), ("species", species)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"element_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"element_linear: x must have shape (N, mul_in, d), got {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError("element_linear: weight must have shape (n_el, mul_in, mul_out), "
                         f"got {tuple(weight.shape)}")
    if species.dim() != 1:
        raise ValueError(f"element_linear: species must have shape (N,), got {tuple(species.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"element_linear: x must be float32 or float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"element_linear: weight dtype {weight.dtype} != x dtype {x.dtype}")
    if species.dtype != torch.int64:
        raise TypeError(f"element_linear: species must be int64, got {species.dtype}")
    if x.device.type != "cuda":
        raise ValueError(f"element_linear: x must be on a CUDA device, got {x.device}")
    for name, t in (("weight", weight), ("species", species)):
        if t.device != x.device:
            raise ValueError(f"element_linear: {name} is on {t.device} but x is on {x.device}")
    if species.shape[0] != x.shape[0]:
        raise ValueError(f"element_linear: species has shape {tuple(species.shape)} but x has "
                         f"N={x.shape[0]} nodes (x shape {tuple(x.shape)})")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"element_linear: weight shape {tuple(weight.shape)} needs mul_in="
                         f"{x.shape[1]} in dim 1 to match x shape {tuple(x.shape)}")
    if weight.shape[0] == 0 and x.shape[0] > 0:
        raise ValueError("element_linear: weight has n_el=0 elements but x has nodes")
    if x.shape[2] % 2 == 0:
        raise ValueError(f"element_linear: x's last dimension must be an irrep's 2l + 1, got {x.shape[2]}")


def _launch(x: torch.Tensor, weight: torch.Tensor, species: torch.Tensor, alpha: float) -> torch.Tensor:
    """Raw kernel call on contiguous inputs (no autograd)."""
    n, mul_in, d = x.shape
    mul_out = weight.shape[2]
    y = x.new_empty((n, mul_out, d))
    if y.numel() == 0:
        return y  # N = 0 (or empty irrep): nothing to launch
    # The extension has its own (static) cudart; it launches on the thread's current CUDA
    # context, which torch.cuda.device makes the primary context of x's device.
    with torch.cuda.device(x.device):
        _C.element_linear_forward(
            x.data_ptr(), weight.data_ptr(), species.data_ptr(), y.data_ptr(),
            n, mul_in, mul_out, d, float(alpha), x.dtype == torch.float64,
            torch.cuda.current_stream(x.device).cuda_stream)
    return y


@functools.lru_cache(maxsize=None)
def _one_path(mul_in: int, mul_out: int, d: int, n_el: int, alpha: float) -> LinearDesc:
    """The element-indexed linear mul_in x l -> mul_out x l (d = 2l + 1) of one path."""
    irreps_in, irreps_out = (o3.Irreps([(mul, ((d - 1) // 2, 1))]) for mul in (mul_in, mul_out))
    return LinearDesc(irreps_in, irreps_out, (Path(0, 0, mul_in, mul_out, alpha, 0),), n_el, "grc",
                      n_el * mul_in * mul_out)


def _grad_weight(x, gy, species, n_el: int, alpha: float) -> torch.Tensor:
    """dL/dW[z] = alpha * sum_{n: species[n]=z} x_n @ gy_n^T: Triton's weight-gradient
    kernel on the path as an element linear of its own, since grouping the nodes by element
    for a loop over elements here read their counts back (a host sync: a training step
    could not be captured in a CUDA graph). Differentiable to any order."""
    from ..triton.element_linear import weight_gradient

    n, mul_in, d = x.shape
    mul_out = gy.shape[1]
    grad = weight_gradient(_one_path(mul_in, mul_out, d, n_el, alpha), species, x.reshape(n, mul_in * d),
                           gy.reshape(n, mul_out * d))
    return grad.view(n_el, mul_in, mul_out)


class _ElementLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, species, alpha):
        track(ctx, x, weight, species)
        ctx.save_for_backward(x, weight, species)
        ctx.alpha = alpha
        return _launch(x, weight, species, alpha)

    @staticmethod
    def backward(ctx, gy):
        # Built from element_matmul itself and Triton's weight gradient, each differentiable, so
        # with create_graph=True the backward is again differentiable (forces -> stress/Hessians).
        x, weight, species = ctx.saved_tensors
        gx = gw = None
        if needed(ctx, 0):
            gx = element_matmul(gy, weight.transpose(1, 2), species, ctx.alpha)
        if needed(ctx, 1):
            gw = _grad_weight(x, gy, species, weight.shape[0], ctx.alpha)
        return gx, gw, None, None


def element_matmul(x: torch.Tensor, weight: torch.Tensor, species: torch.Tensor,
                   alpha: float = 1.0) -> torch.Tensor:
    """y[n, v, m] = alpha * sum_u x[n, u, m] * weight[species[n], u, v] on CUDA.

    x: (N, mul_in, d) float32/float64 (d an irrep's 2l + 1), any strides; weight: (n_el, mul_in, mul_out), same dtype;
    species: int64 (N,) with values in [0, n_el) (not range-checked in the forward, to avoid a
    host sync, like torch indexing). Returns (N, mul_out, d). Differentiable to any order in x and
    weight.
    """
    _check(x, weight, species)
    if _C is None:
        raise RuntimeError(f"sparsekern._C CUDA extension is not available: {_IMPORT_ERROR}")
    return _ElementLinear.apply(x.contiguous(), weight.contiguous(), species.contiguous(), float(alpha))


def element_linear(desc: LinearDesc, x: torch.Tensor, species: torch.Tensor, weight: torch.Tensor,
                   delta: Optional[torch.Tensor]) -> torch.Tensor:
    """The element-indexed linear, one kernel call per path on W0 + dW."""
    n = x.shape[0]
    x_blocks = x.split(desc.blocks_in.sizes, dim=1)
    out = OutputSlots(desc.blocks_out.sizes)
    for p, w in zip(desc.paths, desc.path_weights(effective(weight, delta)) if desc.paths else []):
        d = desc.blocks_in.dims[p.i_in]
        yi = element_matmul(x_blocks[p.i_in].reshape(n, p.mul_in, d), w, species, p.scale)
        out.add(p.i_out, yi.reshape(n, p.mul_out * d))
    return out.cat(x)
