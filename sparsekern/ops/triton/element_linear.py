"""Triton back end of the linears, the irrep linear (``o3.Linear``) and the
element-indexed linear (MACE's ``skip_tp``), each with a block-sparse delta, as one
grouped product over the paths::

    y[n, o] = sum over the paths p into output block o of scale_p x[n, in_p] (W0_p + dW_p)[z_n]

(per irrep component m; with one element, z_n = 0). One launch per forward: a program
per (node tile, output block, column tile) loops over the paths into its block and
stores once, straight into the output (no per-path temporaries, no atomics; a block
without a path is stored as zeros). The paths come from a small table per linear
(:func:`_tables`, built once per device and cached with ``desc.const``); W0 is read from
the flat weight in the descriptor's layout. dW is given by the delta's tiles
(:func:`sparsekern.delta_slot.active_blocks`): ``slot`` (n_tiles,) int32, every path's
(n_el, ceil(mul_in/T), ceil(mul_out/T)) tiles in path order, -1 inactive, else a row of
``values`` (n_tiles, T, T). W0 + dW is formed tile by tile in registers, never in memory.
Nodes are sorted by element once per graph (:class:`ElementRows`, cached with the species;
with one element they stay in order and nothing is built), so each node tile has one
element's weights. The kernels read their feature operands component-major
(:mod:`.component_major`), so that a warp's load of one component's channels is
contiguous; outputs are stored in e3nn's layout.

Derivatives stay in the family: the gradient wrt x is the same launch with the table
transposed (paths grouped by input block, W0 and the tiles read transposed); the
gradients wrt W0 and the delta's tiles are per-element x^T gy products over each
element's rows, one launch for all paths (:class:`_WGrad`), whose own derivatives are
again grouped linears.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...delta_slot import active_blocks, tile_index
from ...paths import OutputSlots
from ..descriptors import LinearDesc
from ..grads import needed, track
from ..tensor_cache import cached, derived
from .component_major import component_major, permutation
from .species_order import element_sort

_BN = 32  # nodes per tile
_BM = 32  # rows ((node, m) pairs) per step
_BK = 32  # tile of mul_in / mul_out (tl.dot needs >= 16)
# A path's row in the table of a map from source blocks to destination blocks (the
# forward: input -> output; transposed: output -> input), 13 columns: 0 source offset,
# 1 destination offset, 2 source mul, 3 destination mul, 4 d, 5 W0's offset, 6-8 W0's
# strides (element, source index, destination index), 9 start in the delta's slot
# table, 10-12 its strides (element, source tile, destination tile).
_COLS = 13
# float32 products as three TF32 tensor-core products (a_hi b_hi + a_hi b_lo + a_lo b_hi,
# each operand split into two TF32 parts): float32's accuracy (about 1e-7 relative on
# MACE's shapes, the parity the tests ask is 1e-5), where "ieee" runs them on the FMA
# units: 4.6 TFLOP/s for layer 1's irrep linear on the H200, slower than torch's GEMM
_F32_DOT: tl.constexpr = tl.constexpr("tf32x3")
_TRANSPOSED = ((0, 1), (2, 3), (7, 8), (11, 12))  # the columns a transposed map swaps


@triton.jit(do_not_specialize=["n_nodes"])
def _lin_kernel(x_ptr, w_ptr, slot_ptr, val_ptr, y_ptr, grp_ptr, path_ptr, scale_ptr, order_ptr, tile_ptr,
                n_nodes, sx0, sx1, sw, sy0, T, sv0, sv1, sv2,
                HAS_W0: tl.constexpr, HAS_DELTA: tl.constexpr, SORTED: tl.constexpr, TR: tl.constexpr, F32: tl.constexpr,
                BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Columns v of destination block program_id(1) (BV of them, program_id(2)) for one
    tile of nodes of one element (program_id(0)): the sum over the block's paths."""
    t = tl.program_id(0)
    g = grp_ptr + tl.program_id(1) * 5
    dst = tl.load(g)
    n_out = tl.load(g + 1)
    d = tl.load(g + 2)
    p0 = tl.load(g + 3)
    p1 = tl.load(g + 4)
    if SORTED:
        z = tl.load(tile_ptr + t * 3)
        n0 = tl.load(tile_ptr + t * 3 + 1)
        n1 = tl.minimum(tl.load(tile_ptr + t * 3 + 2), n0 + BN)
    else:
        z = 0
        n0 = t * BN
        n1 = tl.minimum(n_nodes, n0 + BN)
    v0 = tl.program_id(2) * BV
    v = v0 + tl.arange(0, BV)
    mv = v < n_out
    q_end = tl.where(v0 < n_out, n1 * d, n0 * d)  # column tiles past a narrower block idle
    for q0 in range(n0 * d, q_end, BM):
        q = q0 + tl.arange(0, BM)
        mq = q < n1 * d
        if SORTED:
            node = tl.load(order_ptr + q // d, mask=mq, other=0).to(tl.int64)
        else:
            node = (q // d).to(tl.int64)
        m = q % d
        acc = tl.zeros((BM, BV), dtype=y_ptr.dtype.element_ty)
        for p in range(p0, p1):
            r = path_ptr + p * 13  # the path's row (_COLS)
            src = tl.load(r)
            k = tl.load(r + 2)
            scale = tl.load(scale_ptr + p)
            w_el = tl.load(r + 5) + z * tl.load(r + 6)
            # W0's contiguous index (stride 1 in the table) is the destination one, in the
            # transposed map the source one: the tile is loaded along it (a warp reads
            # 32 consecutive floats) and transposed in registers
            w_step = tl.load(r + 8) if TR else tl.load(r + 7)
            s_el = tl.load(r + 9) + z * tl.load(r + 10)
            sk = tl.load(r + 11)
            sn = tl.load(r + 12)
            x_row = x_ptr + (node * sx0 + (src + m * k) * sx1)[:, None]  # row (n, m): component m's channels
            for u0 in range(0, k, BK):
                u = u0 + tl.arange(0, BK)
                mu = u < k
                a = tl.load(x_row + u[None, :] * sx1, mask=mq[:, None] & mu[None, :], other=0.0)
                muv = mu[:, None] & mv[None, :]
                b = tl.zeros((BK, BV), dtype=acc.dtype)
                if HAS_W0:
                    if TR:
                        b += tl.trans(tl.load(w_ptr + (w_el + v[:, None] * w_step + u[None, :]) * sw,
                                              mask=mv[:, None] & mu[None, :], other=0.0))
                    else:
                        b += tl.load(w_ptr + (w_el + u[:, None] * w_step + v[None, :]) * sw, mask=muv, other=0.0)
                if HAS_DELTA:
                    # the delta's slot of each weight; inactive tiles (-1) cost no value bytes
                    s = s_el + (u // T)[:, None] * sk + (v // T)[None, :] * sn
                    slot = tl.load(slot_ptr + s, mask=muv, other=-1).to(tl.int64)
                    b += tl.load(val_ptr + slot * sv0 + (u % T)[:, None] * sv1 + (v % T)[None, :] * sv2,
                                 mask=slot >= 0, other=0.0)
                if F32:
                    acc += tl.dot(a, b * scale, input_precision=_F32_DOT)
                else:
                    acc += tl.dot(a, b * scale)
        tl.store(y_ptr + node[:, None] * sy0 + dst + v[None, :] * d + m[:, None], acc, mask=mq[:, None] & mv[None, :])


@triton.jit(do_not_specialize=["n_nodes"])
def _wgrad_kernel(a_ptr, b_ptr, out_ptr, path_ptr, scale_ptr, tile_ptr, slot_ptr, order_ptr, seg_ptr,
                  n_nodes, sa0, sa1, sb0, sb1,
                  DELTA: tl.constexpr, SORTED: tl.constexpr, TU: tl.constexpr, TV: tl.constexpr,
                  BQ: tl.constexpr, USE_DOT: tl.constexpr, F32: tl.constexpr):
    """One tile of a weight gradient: scale * sum over the rows (n, m) of element z of
    a[n, in + u*d + m] b[n, out + v*d + m], for the path, element and tile of row
    program_id(0) of the tile table, stored into the flat W0 gradient (the path's
    layout) or, DELTA, into the tile's row of the values gradient (the programs run over
    the slot table in order; an inactive slot: nothing to do)."""
    t = tl.program_id(0)
    r = path_ptr + tl.load(tile_ptr + t * 4) * 13  # the path's row (_COLS)
    z = tl.load(tile_ptr + t * 4 + 1)
    u0 = tl.load(tile_ptr + t * 4 + 2)
    v0 = tl.load(tile_ptr + t * 4 + 3)
    a_off = tl.load(r)
    b_off = tl.load(r + 1)
    mul_in = tl.load(r + 2)
    mul_out = tl.load(r + 3)
    d = tl.load(r + 4)
    scale = tl.load(scale_ptr + tl.load(tile_ptr + t * 4))
    u = u0 + tl.arange(0, TU)
    v = v0 + tl.arange(0, TV)
    mu = u < mul_in
    mv = v < mul_out
    if DELTA:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        active = slot >= 0
        base = slot * TU * TV
        so1 = TV
        so2 = 1
    else:
        active = True
        base = tl.load(r + 5) + z * tl.load(r + 6) + u0 * tl.load(r + 7) + v0 * tl.load(r + 8)
        so1 = tl.load(r + 7)
        so2 = tl.load(r + 8)
    if SORTED:
        qs = tl.load(seg_ptr + z) * d
        qe = tl.where(active, tl.load(seg_ptr + z + 1) * d, qs)
    else:
        qs = 0
        qe = tl.where(active, n_nodes * d, 0)
    acc = tl.zeros((TU, TV), dtype=out_ptr.dtype.element_ty)
    for q0 in range(qs, qe, BQ):
        q = q0 + tl.arange(0, BQ)
        mq = q < qe
        if SORTED:
            node = tl.load(order_ptr + q // d, mask=mq, other=0).to(tl.int64)
        else:
            node = (q // d).to(tl.int64)
        m = q % d
        a = tl.load(a_ptr + node[:, None] * sa0 + (a_off + m[:, None] * mul_in + u[None, :]) * sa1,
                    mask=mq[:, None] & mu[None, :], other=0.0)
        g = tl.load(b_ptr + node[:, None] * sb0 + (b_off + m[:, None] * mul_out + v[None, :]) * sb1,
                    mask=mq[:, None] & mv[None, :], other=0.0)
        if USE_DOT:
            if F32:
                acc += tl.dot(tl.trans(a), g, input_precision=_F32_DOT)
            else:
                acc += tl.dot(tl.trans(a), g)
        else:  # tiles below tl.dot's 16 x 16 minimum
            acc += tl.sum(a[:, :, None] * g[:, None, :], axis=0)
    rr = tl.arange(0, TU)
    cc = tl.arange(0, TV)
    tl.store(out_ptr + base + rr[:, None] * so1 + cc[None, :] * so2, acc * scale,
             mask=mu[:, None] & mv[None, :] & active)


@dataclass
class ElementRows:
    """The node tiles of one call, each one element's, built with device ops only (no
    host synchronisation) and shared by every launch of the call's passes. With one
    element the nodes stay in order and tile t is nodes t*_BN.. (no tensors)."""
    n: int  # nodes
    n_tiles: int
    order: Optional[torch.Tensor] = None  # (N,) node indices sorted by element
    seg: Optional[torch.Tensor] = None  # (n_el + 1,): element z owns sorted nodes seg[z]:seg[z+1]
    tiles: Optional[torch.Tensor] = None  # (n_tiles, 3): element, first sorted node, the element's end

    @staticmethod
    def in_order(n: int) -> "ElementRows":
        return ElementRows(n, triton.cdiv(n, _BN))

    @staticmethod
    def build(species: torch.Tensor, n_el: int) -> "ElementRows":
        n = species.shape[0]
        if n_el == 1:
            return ElementRows.in_order(n)
        sort = element_sort(species, n_el)  # (the contraction's too)
        order, seg = sort.order, sort.start.long()
        counts = seg[1:] - seg[:-1]
        ntile = (counts + _BN - 1) // _BN
        tcum = ntile.cumsum(0)
        t = torch.arange(triton.cdiv(n, _BN) + n_el, device=species.device)
        # tiles past the last element's start at or after its end: empty
        z = torch.searchsorted(tcum, t, right=True).clamp_(max=n_el - 1)
        first = seg[z] + (t - tcum[z] + ntile[z]) * _BN
        return ElementRows(n, t.shape[0], order, seg, torch.stack([z, first, seg[z + 1]], 1))


class _Tables(NamedTuple):
    """The grouped kernel's view of a linear in one direction (the forward, or
    transposed: output blocks in, input blocks out)."""
    # int32: with int64 tables (and the path's loads inside the K loop) some
    # specialisations spilled 4 B at 80-96 registers on sm_90
    groups: torch.Tensor  # (destination blocks, 5): offset, mul, d, first path row, end path row
    paths: torch.Tensor  # (paths, _COLS), rows grouped by destination block
    scales: torch.Tensor  # (paths,) each row's scale
    max_k: int  # widest source mul
    max_n: int  # widest destination block (a block no path reaches is stored too: zeros)
    perm: Optional[torch.Tensor]  # the source features' component-major columns (None: all scalars)


def _rows(desc: LinearDesc, tr: bool) -> List[int]:
    """The paths' order in the table: grouped by destination block."""
    return sorted(range(len(desc.paths)), key=lambda i: desc.paths[i].i_in if tr else desc.paths[i].i_out)


def _tables(desc: LinearDesc, like: torch.Tensor, tr: bool, T: int) -> _Tables:
    """The path table (columns above; the delta's tiles T x T, T = 0: no delta), the
    destination blocks, and the scales, cached per device."""
    def build():
        rows, s_off, n_el = [], 0, desc.num_elements
        for p in desc.paths:
            nu, nv = (-(-p.mul_in // T), -(-p.mul_out // T)) if T else (0, 0)
            sw_u, sw_z = (p.mul_out, p.mul_in * p.mul_out) if desc.layout == "grc" else (n_el * p.mul_out, p.mul_out)
            row = [desc.blocks_in.offsets[p.i_in], desc.blocks_out.offsets[p.i_out], p.mul_in, p.mul_out,
                   desc.blocks_in.dims[p.i_in], p.weight_offset, sw_z, sw_u, 1, s_off, nu * nv, nv, 1]
            if tr:
                for i, j in _TRANSPOSED:
                    row[i], row[j] = row[j], row[i]
            rows.append(row)
            s_off += n_el * nu * nv
        order = _rows(desc, tr)
        src, dst = (desc.blocks_out, desc.blocks_in) if tr else (desc.blocks_in, desc.blocks_out)
        ends = [desc.paths[i].i_in if tr else desc.paths[i].i_out for i in order]  # sorted
        groups = [[dst.offsets[b], dst.muls[b], dst.dims[b], bisect_left(ends, b), bisect_right(ends, b)]
                  for b in range(len(dst.muls))]
        return _Tables(torch.tensor(groups, dtype=torch.int32).view(-1, 5),
                       torch.tensor([rows[i] for i in order], dtype=torch.int32).view(-1, _COLS),
                       torch.tensor([desc.paths[i].scale for i in order], dtype=torch.float64),
                       max((r[2] for r in rows), default=0), max(dst.muls, default=0),
                       permutation(zip(src.offsets, src.dims, src.muls), src.dim, like.device))
    return desc.const(("triton_linear", tr, T), like, build)


def _wtiles(desc: LinearDesc, like: torch.Tensor, size: int) -> torch.Tensor:
    """(path row of the forward table, element, first row, first column) of each
    size x size tile of every path's (n_el, mul_in, mul_out) weights, path after path,
    row-major: with size T, the delta's slot table's order."""
    def build():
        row_of = {i: r for r, i in enumerate(_rows(desc, False))}
        tiles = [(row_of[i], z, u, v) for i, p in enumerate(desc.paths) for z in range(desc.num_elements)
                 for u in range(0, p.mul_in, size) for v in range(0, p.mul_out, size)]
        return torch.tensor(tiles, dtype=torch.int32).view(-1, 4)
    return desc.const(("triton_linear_tiles", size), like, build)


class _Call(NamedTuple):
    """What every launch of one call's passes shares."""
    desc: LinearDesc
    plan: ElementRows
    slot: Optional[torch.Tensor]  # the delta's slot table (None: no delta)
    T: int  # the delta's tile size (0: no delta)
    n_tiles: int  # rows of the delta's values


def _lin_raw(call: _Call, x: torch.Tensor, w0: Optional[torch.Tensor], vals: Optional[torch.Tensor],
             tr: bool) -> torch.Tensor:
    desc, plan = call.desc, call.plan
    y = x.new_empty(plan.n, desc.blocks_in.dim if tr else desc.blocks_out.dim)
    has_w0 = w0 is not None
    has_delta = vals is not None and vals.shape[0] > 0
    if y.numel() == 0:
        return y
    if not (has_w0 or has_delta):
        return y.zero_()
    tab = _tables(desc, x, tr, call.T)
    x = component_major(x, tab.perm)
    w0_ = w0 if has_w0 else x
    slot_ = call.slot if has_delta else x
    vals_ = vals if has_delta else x
    sv0, sv1, sv2 = vals.stride() if has_delta else (0, 0, 0)
    # with a delta the weight tile is summed from two loads: a 16-deep K tile keeps the
    # float32 product within 255 registers on sm_90 (32 deep spilled 28 B)
    bk = max(16, min(16 if has_delta else _BK, triton.next_power_of_2(tab.max_k)))
    bv = max(16, min(_BK, triton.next_power_of_2(tab.max_n)))
    sorted_ = plan.order is not None
    grid = (plan.n_tiles, tab.groups.shape[0], triton.cdiv(tab.max_n, bv))
    # num_stages=1 (also for the W-gradient): with Triton's default software pipelining,
    # the kernels that read nodes in order reached 255 registers and spilled on sm_90
    _lin_kernel[grid](x, w0_, slot_, vals_, y, tab.groups, tab.paths, tab.scales,
                      plan.order if sorted_ else x, plan.tiles if sorted_ else x,
                      plan.n, *x.stride(), w0_.stride(0), y.stride(0), max(call.T, 1),
                      sv0, *((sv2, sv1) if tr else (sv1, sv2)),
                      HAS_W0=has_w0, HAS_DELTA=has_delta, SORTED=sorted_, TR=tr, F32=x.dtype == torch.float32,
                      BN=_BN, BM=_BM, BK=bk, BV=bv, num_stages=1)
    return y


def _wgrad_raw(call: _Call, a: torch.Tensor, b: torch.Tensor, delta: bool) -> torch.Tensor:
    """The flat W0 gradient (delta False), or the gradient of the delta's values (the
    active tiles only), from a (N, irreps_in.dim) and b (N, irreps_out.dim)."""
    desc, plan = call.desc, call.plan
    size = call.T if delta else _BK
    if delta:  # rows no slot points to, and tile edges, are not stored
        out = a.new_zeros(call.n_tiles, size, size)
    else:  # every tile is stored, also empty elements' (weights outside every path: zeros)
        covered = sum(p.mul_in * p.mul_out for p in desc.paths) * desc.num_elements == desc.weight_numel
        out = a.new_empty(desc.weight_numel) if covered and plan.n else a.new_zeros(desc.weight_numel)
    tiles = _wtiles(desc, a, size)
    if tiles.shape[0] == 0 or plan.n == 0 or out.numel() == 0:
        return out
    tab = _tables(desc, a, False, call.T)
    a, b = component_major(a, tab.perm), component_major(b, _tables(desc, a, True, call.T).perm)
    sorted_ = plan.order is not None
    use_dot = size >= 16
    bq = 32 if use_dot else max(1, min(32, 512 // (size * size)))
    # float64 products over 4 warps spill on sm_90 (ptxas keeps 80-96 registers), over 8 not
    warps = 8 if a.dtype == torch.float64 else 4
    _wgrad_kernel[(tiles.shape[0],)](a, b, out, tab.paths, tab.scales, tiles, call.slot if delta else a,
                                     plan.order if sorted_ else a, plan.seg if sorted_ else a,
                                     plan.n, *a.stride(), *b.stride(),
                                     DELTA=delta, SORTED=sorted_, TU=size, TV=size, BQ=bq,
                                     USE_DOT=use_dot, F32=a.dtype == torch.float32, num_warps=warps, num_stages=1)
    return out


class _Lin(torch.autograd.Function):
    """The grouped linear of x with W0 (flat; None: none) and the delta's values (None:
    none); ``tr``: the transposed map (x has the output features, y the input ones)."""

    @staticmethod
    def forward(ctx, x, w0, vals, call, tr):
        track(ctx, x, w0, vals)
        ctx.save_for_backward(x, w0, vals)
        ctx.call, ctx.tr = call, tr
        return _lin_raw(call, x, w0, vals, tr)

    @staticmethod
    def backward(ctx, gy):
        x, w0, vals = ctx.saved_tensors
        call, tr = ctx.call, ctx.tr
        a, b = (gy, x) if tr else (x, gy)  # input features, output features
        gx = _Lin.apply(gy, w0, vals, call, not tr) if needed(ctx, 0) else None
        gw0 = _WGrad.apply(a, b, call, False) if needed(ctx, 1) else None
        gvals = _WGrad.apply(a, b, call, True) if needed(ctx, 2) else None
        return gx, gw0, gvals, None, None


class _WGrad(torch.autograd.Function):
    """W-gradient a^T b per path and element (a: input features, b: output features):
    bilinear in (a, b), so its derivatives are grouped linears with the incoming
    gradient G as the weight (W0, or the delta's values)."""

    @staticmethod
    def forward(ctx, a, b, call, delta):
        track(ctx, a, b)
        ctx.save_for_backward(a, b)
        ctx.call, ctx.delta = call, delta
        return _wgrad_raw(call, a, b, delta)

    @staticmethod
    def backward(ctx, G):
        a, b = ctx.saved_tensors
        call, delta = ctx.call, ctx.delta
        w0, vals = (None, G) if delta else (G, None)
        da = _Lin.apply(b, w0, vals, call, True) if needed(ctx, 0) else None
        db = _Lin.apply(a, w0, vals, call, False) if needed(ctx, 1) else None
        return da, db, None, None


def grouped_linear(x: torch.Tensor, plan: ElementRows, desc: LinearDesc, weight: Optional[torch.Tensor],
                   blocks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """y (N, irreps_out.dim) = sum over the paths into each output block of
    scale * x_in (W0 + dW)[z_n], for x (N, irreps_in.dim): one launch. ``weight``: W0,
    flat in the descriptor's layout (None: none); ``blocks``: None, or the delta's
    (slot, values) as :func:`sparsekern.delta_slot.active_blocks` gives them for the
    descriptor's weight groups. Gradients: x, W0 and the values (active tiles only), to
    any order."""
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"float32 or float64 expected, got {x.dtype}")
    slot, vals = blocks if blocks is not None else (None, None)
    T = vals.shape[1] if vals is not None else 0
    if vals is not None:
        want = sum(-(-p.mul_in // T) * -(-p.mul_out // T) for p in desc.paths) * desc.num_elements
        if slot.shape != (want,) or slot.dtype != torch.int32 or vals.shape[1:] != (T, T) or vals.dtype != x.dtype:
            raise ValueError(f"the delta's blocks: slot int32 ({want},) and values {x.dtype} (n, {T}, {T}) "
                             f"expected, got {slot.dtype} {tuple(slot.shape)} and {vals.dtype} {tuple(vals.shape)}")
    call = _Call(desc, plan, slot, T, vals.shape[0] if vals is not None else 0)
    return _Lin.apply(x, weight, vals, call, False)


def _plan(species: torch.Tensor, n_el: int) -> ElementRows:
    """The call's node tiles by element, once per species tensor (every layer and pass shares them)."""
    return cached(species, ("element_rows", n_el), lambda: ElementRows.build(species, n_el))


def weight_gradient(desc: LinearDesc, species: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The flat W0 gradient of ``desc``'s element-indexed linear from its input features a
    (N, irreps_in.dim) and its output's gradient b (N, irreps_out.dim): the nodes grouped
    by element on the device (no host sync); differentiable to any order."""
    plan = _plan(species, desc.num_elements)
    return _WGrad.apply(a, b, _Call(desc, plan, None, 0, 0), False)


def _blocks(desc: LinearDesc, delta: Optional[torch.Tensor]):
    """W0 + dW is formed tile by tile from the delta's active 16x16 blocks, never materialised."""
    if delta is None:
        return None
    index = desc.const("tile_index16", delta, lambda: tile_index(desc.weight_groups(), 16, delta.numel()))
    return derived([delta], ("active_blocks", 16), lambda: active_blocks(delta, desc.weight_groups(), 16, index))


def element_linear(desc: LinearDesc, x: torch.Tensor, species: torch.Tensor, weight: torch.Tensor,
                   delta: Optional[torch.Tensor]) -> torch.Tensor:
    """The element-indexed linear: x (N, irreps_in.dim) -> (N, irreps_out.dim)."""
    plan = _plan(species, desc.num_elements)
    return grouped_linear(x, plan, desc, weight, _blocks(desc, delta))


def linear(desc: LinearDesc, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           delta: Optional[torch.Tensor]) -> torch.Tensor:
    """The irrep linear as the grouped linear with one element (biases added in torch)."""
    plan = ElementRows.in_order(x.shape[0])
    y = grouped_linear(x, plan, desc, weight, _blocks(desc, delta))
    if desc.bias_paths:  # one row of every output block's bias (zeros where none), broadcast
        row = OutputSlots(desc.blocks_out.sizes)
        desc.add_biases(bias, row, 1)
        y = y + row.cat(bias.view(1, -1))
    return y
