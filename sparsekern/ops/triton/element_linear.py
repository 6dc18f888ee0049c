"""Triton back end of the linears: the element-indexed linear with a block-sparse delta
(MACE's ``skip_tp``)::

    y[n, v, m] = scale * sum_u x[n, u, m] (W0[z_n, u, v] + dW[z_n, u, v])

dW is given by ``block_slot`` (n_el, ceil(mul_in/T), ceil(mul_out/T)) int32 (-1: inactive,
else a row of ``block_values`` (n_blocks, T, T)). W0 + dW is formed tile by tile in
registers, never in memory. Nodes are sorted by element once; rows of the GEMM are
(sorted node, component m) pairs, so each tile of rows has one element's weight.

Derivatives stay in the family: the gradient wrt x is the same op with W0, block_slot
and block_values transposed; the gradients wrt W0 and the active blocks are per-element
x^T gy products over each element's rows (:class:`_WGrad`), whose own derivatives are
again element linears. With n_el = 1 and all species 0 it is the irrep linear
(``o3.Linear``) with a block-sparse delta: :func:`linear`. Both ops go through
:func:`path_linears` (one call per path, summed into the output irreps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ...delta_slot import active_blocks
from ...paths import OutputSlots
from ..descriptors import LinearDesc

_BM = 32  # rows ((node, m) pairs) per tile
_BK = 32  # tile of mul_in / mul_out (tl.dot needs >= 16)


@triton.jit
def _el_kernel(x_ptr, w0_ptr, slot_ptr, val_ptr, y_ptr, order_ptr, tz_ptr, tq0_ptr, tq1_ptr,
               mul_in, mul_out, d, T, scale_ptr,
               sx0, sx1, sx2, sw0, sw1, sw2, ss0, ss1, ss2, sv0, sv1, sv2,
               HAS_W0: tl.constexpr, HAS_DELTA: tl.constexpr, IEEE: tl.constexpr,
               BM: tl.constexpr, BU: tl.constexpr, BV: tl.constexpr):
    t = tl.program_id(0)
    scale = tl.load(scale_ptr)  # a tensor, not a Python float (which Triton passes as fp32)
    z = tl.load(tz_ptr + t).to(tl.int64)
    q0 = tl.load(tq0_ptr + t)
    q1 = tl.load(tq1_ptr + t)
    q = q0 + tl.arange(0, BM)
    mq = q < q1
    node = tl.load(order_ptr + q // d, mask=mq, other=0).to(tl.int64)
    m = (q % d).to(tl.int64)
    v = tl.program_id(1) * BV + tl.arange(0, BV)
    mv = v < mul_out
    acc = tl.zeros((BM, BV), dtype=y_ptr.dtype.element_ty)
    for u0 in range(0, mul_in, BU):
        u = u0 + tl.arange(0, BU)
        mu = u < mul_in
        a = tl.load(x_ptr + node[:, None] * sx0 + u[None, :].to(tl.int64) * sx1 + m[:, None] * sx2,
                    mask=mq[:, None] & mu[None, :], other=0.0)
        muv = mu[:, None] & mv[None, :]
        b = tl.zeros((BU, BV), dtype=acc.dtype)
        if HAS_W0:
            b += tl.load(w0_ptr + z * sw0 + u[:, None] * sw1 + v[None, :] * sw2, mask=muv, other=0.0)
        if HAS_DELTA:
            # the delta's slot of each weight; inactive blocks (-1) cost no value bytes
            slot = tl.load(slot_ptr + z * ss0 + (u // T)[:, None] * ss1 + (v // T)[None, :] * ss2,
                           mask=muv, other=-1).to(tl.int64)
            b += tl.load(val_ptr + slot * sv0 + (u % T)[:, None] * sv1 + (v % T)[None, :] * sv2,
                         mask=slot >= 0, other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")  # fp32: no TF32 (1e-5 parity)
        else:
            acc += tl.dot(a, b)
    y_off = node[:, None] * (mul_out * d) + v[None, :].to(tl.int64) * d + m[:, None]
    tl.store(y_ptr + y_off, acc * scale, mask=mq[:, None] & mv[None, :])


@triton.jit
def _wgrad_kernel(x_ptr, g_ptr, out_ptr, order_ptr, seg_ptr, tz_ptr, tu_ptr, tv_ptr, tb_ptr,
                  mul_in, mul_out, d, scale_ptr, sx0, sx1, sx2, sg0, sg1, sg2, so1, so2,
                  TU: tl.constexpr, TV: tl.constexpr, BQ: tl.constexpr,
                  USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """out[base + a*so1 + c*so2] = scale * sum over the rows (n, m) of element z of
    x[n, u0 + a, m] g[n, v0 + c, m]: one output tile (a dense W0 tile or one block of the
    delta; base < 0: an inactive block, nothing to do)."""
    t = tl.program_id(0)
    scale = tl.load(scale_ptr)
    z = tl.load(tz_ptr + t)
    u = tl.load(tu_ptr + t) + tl.arange(0, TU)
    v = tl.load(tv_ptr + t) + tl.arange(0, TV)
    base = tl.load(tb_ptr + t)
    mu = u < mul_in
    mv = v < mul_out
    active = base >= 0
    qs = tl.load(seg_ptr + z) * d
    qe = tl.where(active, tl.load(seg_ptr + z + 1) * d, qs)
    acc = tl.zeros((TU, TV), dtype=out_ptr.dtype.element_ty)
    for q0 in range(qs, qe, BQ):
        q = q0 + tl.arange(0, BQ)
        mq = q < qe
        node = tl.load(order_ptr + q // d, mask=mq, other=0).to(tl.int64)
        m = (q % d).to(tl.int64)
        a = tl.load(x_ptr + node[:, None] * sx0 + u[None, :].to(tl.int64) * sx1 + m[:, None] * sx2,
                    mask=mq[:, None] & mu[None, :], other=0.0)
        g = tl.load(g_ptr + node[:, None] * sg0 + v[None, :].to(tl.int64) * sg1 + m[:, None] * sg2,
                    mask=mq[:, None] & mv[None, :], other=0.0)
        if USE_DOT:
            if IEEE:
                acc += tl.dot(tl.trans(a), g, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(a), g)
        else:  # blocks below tl.dot's 16 x 16 minimum
            acc += tl.sum(a[:, :, None] * g[:, None, :], axis=0)
    r = tl.arange(0, TU)
    c = tl.arange(0, TV)
    tl.store(out_ptr + base + r[:, None] * so1 + c[None, :] * so2, acc * scale,
             mask=mu[:, None] & mv[None, :] & active)


@dataclass
class ElementRows:
    """Nodes sorted by element and the row tiles of the forward GEMM, built with
    device ops only (no host synchronisation)."""
    order: torch.Tensor  # (N,) node indices sorted by element
    seg: torch.Tensor  # (n_el + 1,) int64: element z owns sorted nodes seg[z]:seg[z+1]
    tz: torch.Tensor
    tq0: torch.Tensor
    tq1: torch.Tensor
    n_el: int
    d: int

    @staticmethod
    def build(species: torch.Tensor, n_el: int, d: int) -> "ElementRows":
        n = species.shape[0]
        order = torch.argsort(species, stable=True)
        # not bincount: its output size depends on the data (a host sync)
        counts = species.new_zeros(n_el).index_add_(0, species, torch.ones_like(species))
        seg = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        ntile = (counts * d + _BM - 1) // _BM
        tcum = ntile.cumsum(0)
        t = torch.arange(triton.cdiv(n * d, _BM) + n_el, device=species.device)
        z = torch.searchsorted(tcum, t, right=True)
        valid = z < n_el
        zc = z.clamp(max=max(n_el - 1, 0))
        q0 = seg[zc] * d + (t - tcum[zc] + ntile[zc]) * _BM
        q1 = seg[zc + 1] * d
        zero = torch.zeros_like(q0)
        return ElementRows(order, seg, zc.to(torch.int32), torch.where(valid, q0, zero), torch.where(valid, q1, zero),
                    n_el, d)


def _el_raw(plan: ElementRows, x, w0, slot, vals, scale: float, mul_out: int) -> torch.Tensor:
    n, mul_in, d = x.shape
    y = x.new_empty(n, mul_out, d)
    if y.numel() == 0 or plan.n_el == 0:
        return y.zero_()
    has_w0 = w0 is not None
    has_delta = vals is not None and vals.shape[0] > 0
    if not (has_w0 or has_delta) or mul_in == 0:
        return y.zero_()
    w0_ = w0 if has_w0 else x
    slot_ = slot if has_delta else x
    vals_ = vals if has_delta else x
    T = vals.shape[1] if has_delta else 1
    # with a delta the weight tile is summed from two loads: a 16-deep K tile keeps the
    # fp32 IEEE product within 255 registers on sm_90 (32 deep spilled 28 B)
    bu = max(16, min(16 if has_delta else _BK, triton.next_power_of_2(mul_in)))
    bv = max(16, min(_BK, triton.next_power_of_2(mul_out)))
    grid = (plan.tz.shape[0], triton.cdiv(mul_out, bv))
    _el_kernel[grid](x, w0_, slot_, vals_, y, plan.order, plan.tz, plan.tq0, plan.tq1,
                     mul_in, mul_out, d, T, x.new_full((1,), scale), *x.stride(), *w0_.stride()[:3],
                     *slot_.stride()[:3], *vals_.stride()[:3],
                     HAS_W0=has_w0, HAS_DELTA=has_delta, IEEE=x.dtype == torch.float32,
                     BM=_BM, BU=bu, BV=bv)
    return y


def _wgrad_raw(plan: ElementRows, x, g, scale: float, slot: Optional[torch.Tensor], vshape) -> torch.Tensor:
    """Dense (n_el, mul_in, mul_out) gradient if ``slot`` is None, else (n_blocks, T, T)
    for the active blocks of ``slot`` only."""
    mul_in, mul_out, dev = x.shape[1], g.shape[1], x.device
    if slot is None:
        out = x.new_empty(plan.n_el, mul_in, mul_out)  # every tile is stored, also empty elements'
        tu_ = tv_ = _BK
        zz, uu, vv = _grid(plan.n_el, -(-mul_in // tu_), -(-mul_out // tv_), dev)
        uu, vv = uu * tu_, vv * tv_
        base = zz * out.stride(0) + uu * out.stride(1) + vv * out.stride(2)
    else:
        out = x.new_zeros(vshape)  # rows no slot points to, and tile edges, are not stored
        tu_ = tv_ = T = vshape[1]
        # a program per slot entry, inactive ones (-1) idle: no nonzero (a host sync)
        zz, uu, vv = _grid(*slot.shape, dev)
        uu, vv = uu * T, vv * T
        base = slot.flatten().long() * out.stride(0)
    if zz.numel() == 0 or x.shape[0] == 0 or out.numel() == 0:
        return out.zero_()
    use_dot = min(tu_, tv_) >= 16
    bq = 32 if use_dot else max(1, min(32, 512 // (tu_ * tv_)))
    _wgrad_kernel[(zz.numel(),)](x, g, out, plan.order, plan.seg, zz.int(), uu.int(), vv.int(), base,
                                 mul_in, mul_out, plan.d, x.new_full((1,), scale), *x.stride(), *g.stride(),
                                 out.stride(1), out.stride(2), TU=tu_, TV=tv_, BQ=bq,
                                 USE_DOT=use_dot, IEEE=x.dtype == torch.float32)
    return out


def _grid(n_el: int, nu: int, nv: int, dev):
    """(element, row tile, column tile) of each program, row-major."""
    zz, uu, vv = torch.meshgrid(torch.arange(n_el, device=dev), torch.arange(nu, device=dev),
                                torch.arange(nv, device=dev), indexing="ij")
    return zz.flatten(), uu.flatten(), vv.flatten()


def _t(w):
    return None if w is None else w.transpose(1, 2)


class _El(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, vals, plan, slot, scale, mul_out):
        ctx.save_for_backward(x, w0, vals)
        ctx.plan, ctx.slot, ctx.scale = plan, slot, scale
        return _el_raw(plan, x, w0, slot, vals, scale, mul_out)

    @staticmethod
    def backward(ctx, gy):
        x, w0, vals = ctx.saved_tensors
        plan, slot, scale = ctx.plan, ctx.slot, ctx.scale
        gx = gw0 = gvals = None
        if ctx.needs_input_grad[0]:
            gx = _El.apply(gy, _t(w0), _t(vals), plan, _t(slot), scale, x.shape[1])
        if ctx.needs_input_grad[1]:
            gw0 = _WGrad.apply(x, gy, plan, scale, None, None)
        if ctx.needs_input_grad[2]:
            gvals = _WGrad.apply(x, gy, plan, scale, slot, tuple(vals.shape))
        return gx, gw0, gvals, None, None, None, None


class _WGrad(torch.autograd.Function):
    """W-gradient x^T gy per element: bilinear in (x, gy), so its derivatives are element
    linears with the incoming gradient G as the weight (dense, or blocks of ``slot``)."""

    @staticmethod
    def forward(ctx, x, gy, plan, scale, slot, vshape):
        ctx.save_for_backward(x, gy)
        ctx.plan, ctx.scale, ctx.slot = plan, scale, slot
        return _wgrad_raw(plan, x, gy, scale, slot, vshape)

    @staticmethod
    def backward(ctx, G):
        x, gy = ctx.saved_tensors
        plan, scale, slot = ctx.plan, ctx.scale, ctx.slot
        dense = slot is None
        dx = dgy = None
        if ctx.needs_input_grad[0]:
            dx = (_El.apply(gy, G.transpose(1, 2), None, plan, None, scale, x.shape[1]) if dense
                  else _El.apply(gy, None, G.transpose(1, 2), plan, slot.transpose(1, 2), scale, x.shape[1]))
        if ctx.needs_input_grad[1]:
            dgy = (_El.apply(x, G, None, plan, None, scale, gy.shape[1]) if dense
                   else _El.apply(x, None, G, plan, slot, scale, gy.shape[1]))
        return dx, dgy, None, None, None, None


def element_matmul(x: torch.Tensor, w0: Optional[torch.Tensor], species: torch.Tensor, scale: float = 1.0,
                   block_slot: Optional[torch.Tensor] = None, block_values: Optional[torch.Tensor] = None,
                   mul_out: Optional[int] = None, plan: Optional[ElementRows] = None) -> torch.Tensor:
    """y (N, mul_out, d) = scale * x[n] (W0[z_n] + dW[z_n]) for x (N, mul_in, d),
    W0 (n_el, mul_in, mul_out) or None (delta only), species (N,) int64 in [0, n_el).
    dW: ``block_slot`` int32 (n_el, ceil(mul_in/T), ceil(mul_out/T)), -1 = inactive, else a
    row of ``block_values`` (n_blocks, T, T). Gradients: x, W0 and block_values (active
    blocks only), to any order. ``mul_out`` is needed only without W0 (default: all
    column tiles). ``plan`` (:meth:`ElementRows.build`) can be shared by the calls
    of one forward pass with the same species and d."""
    if x.dim() != 3:
        raise ValueError(f"x must have shape (N, mul_in, d), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"float32 or float64 expected, got {x.dtype}")
    if (block_slot is None) != (block_values is None):
        raise ValueError("block_slot and block_values go together")
    if w0 is None and block_values is None:
        raise ValueError("need W0, a delta, or both")
    if w0 is not None:
        if w0.dim() != 3 or w0.shape[1] != x.shape[1]:
            raise ValueError(f"W0 must have shape (n_el, {x.shape[1]}, mul_out), got {tuple(w0.shape)}")
        n_el, mul_out = w0.shape[0], w0.shape[2]
    else:
        n_el = block_slot.shape[0]
        mul_out = mul_out if mul_out is not None else block_slot.shape[2] * block_values.shape[1]
    if block_values is not None:
        T = block_values.shape[1]
        if block_values.dim() != 3 or block_values.shape[2] != T or T & (T - 1):
            raise ValueError(f"block_values must have shape (n_blocks, T, T), T a power of two, "
                             f"got {tuple(block_values.shape)}")
        want = (n_el, -(-x.shape[1] // T), -(-mul_out // T))
        if tuple(block_slot.shape) != want or block_slot.dtype != torch.int32:
            raise ValueError(f"block_slot must be int32 of shape {want}, got {block_slot.dtype} "
                             f"{tuple(block_slot.shape)}")
        if block_values.dtype != x.dtype:
            raise TypeError(f"block_values is {block_values.dtype}, x {x.dtype}")
    if w0 is not None and w0.dtype != x.dtype:
        raise TypeError(f"W0 is {w0.dtype}, x {x.dtype}")
    if species.shape != (x.shape[0],):
        raise ValueError(f"species must have shape ({x.shape[0]},), got {tuple(species.shape)}")
    if plan is None:
        plan = ElementRows.build(species, n_el, x.shape[2])
    return _El.apply(x, w0, block_values, plan, block_slot, float(scale), mul_out)


def path_linears(x: torch.Tensor, species: torch.Tensor, desc: LinearDesc, weight: Optional[torch.Tensor],
                 blocks=None) -> OutputSlots:
    """Per output irrep, the sum over the paths of scale * x_in (W0 + dW)[z_n]: one kernel
    call per path, one row plan per irrep dimension. x (N, irreps_in.dim); ``blocks``
    None, or per path None or the (block_slot, block_values) of its delta."""
    n = x.shape[0]
    x_blocks = x.split(desc.blocks_in.sizes, dim=1)
    out = OutputSlots(desc.blocks_out.sizes)
    plans = {}
    for t, (p, w) in enumerate(zip(desc.paths, desc.path_weights(weight) if desc.paths else [])):
        d = desc.blocks_in.dims[p.i_in]
        if d not in plans:
            plans[d] = ElementRows.build(species, desc.num_elements, d)
        slot, vals = blocks[t] if blocks is not None and blocks[t] is not None else (None, None)
        yi = element_matmul(x_blocks[p.i_in].reshape(n, p.mul_in, d), w, species, p.scale, slot, vals,
                            plan=plans[d]).reshape(n, p.mul_out * d)
        out.add(p.i_out, yi)
    return out


def _blocks(desc: LinearDesc, delta: Optional[torch.Tensor]):
    """W0 + dW is formed tile by tile from the delta's active 16x16 blocks, never materialised."""
    return active_blocks(delta, desc.weight_groups(), 16) if delta is not None else None


def element_linear(desc: LinearDesc, x: torch.Tensor, species: torch.Tensor, weight: torch.Tensor,
                   delta: Optional[torch.Tensor]) -> torch.Tensor:
    """The element-indexed linear: x (N, irreps_in.dim) -> (N, irreps_out.dim)."""
    return path_linears(x, species, desc, weight, _blocks(desc, delta)).cat(x)


def linear(desc: LinearDesc, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           delta: Optional[torch.Tensor]) -> torch.Tensor:
    """The irrep linear as the element linear with one element (biases added in torch)."""
    species = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    out = path_linears(x, species, desc, weight, _blocks(desc, delta))
    desc.add_biases(bias, out, x.shape[0])
    return out.cat(x)
