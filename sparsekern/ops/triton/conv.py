"""Triton back end of the channelwise ('uvu') tensor product and the fused convolution.

One form covers the forward pass and all its derivatives::

    out[dst(e), O_p(u, k)] += c * w[e, W_p(u)] * a[src(e), A_p(u, i)] * b[e, B_p(j)]

summed over the active paths p and the NONZERO coefficients (i, j, k, c) of each path
(c = path_weight * Clebsch-Gordan, exactly the torch back end's values). ``a`` is gathered
from ``src`` and the sum over each receiver's edges is done in registers, all in one
kernel without atomics: the edges are ordered by receiver once per graph
(:class:`Segments`, cached per ``edge_index``), each program owns a tile of receivers and
one output irrep and stores every output element once (deterministic).

The kernels are generated per form (:mod:`.generated`): offsets, multiplicities and the
coefficients are literals in the source, so each operand component is loaded once per
edge and path and every output component of the irrep is accumulated in the same pass
(a table-driven kernel re-read w and a per coefficient and per output component, and
the table itself, about 4x the bytes; benchmarks/conv_loads.py counts them). The node-side
operands they gather (a, and the output gradient g) are read from a component-major copy
(:attr:`ConvForm.a_perm`), so that a channel tile of one component is one contiguous run
of memory; outputs are stored in the usual layout.

- gradient wrt ``a``: the same form with the table transposed (i <-> k, A <-> O), ``a``
  := the output gradient, gathered from ``dst`` and summed over each sender's edges (the
  ordering by sender);
- gradients wrt ``b`` and ``w``: a per-edge kernel (:func:`_edge`), which sums b's
  gradient over all paths in registers (one program per edge tile);
- all three at once (the usual backward: forces need b's and w's, and a's from the
  second layer on): one fused kernel over the edges by sender (:func:`_grads_source`),
  which reads each edge's w, b and g[dst] once for all three;
- the fused backward's own backward (force training's double backward, not
  differentiated further): two launches, a's, b's and w's gradients by sender (the fused
  kernel's ``DBL``: the same walk, each edge's operands and their incoming gradients read
  once) and g's by receiver (the conv kernel with three products, ``TWO`` and ``A2``);
- differentiated further (``create_graph``), the per-edge kernel's own derivatives are
  again convs and per-edge kernels: its two convs into each of a's and g's gradients as
  one launch (``TWO``: two (b, w) pairs, a gathered once), b's and w's gradients as one
  per-edge launch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..descriptors import TPDesc
from ..grads import needed, summed, track
from ..tensor_cache import cache_of
from .component_major import component_major, permutation
from .generated import jit, literal


@triton.jit
def _receiver_tile(start_ptr, N, IDENTITY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """A program's tile rows: (receiver n, slot) with slot the rank of an edge among n's,
    BLOCK_S slots at a time; each receiver's first edge in the ordering, its in-degree and
    the tile's largest. IDENTITY: edge n -> node n (the per-edge product), BLOCK_S 1."""
    row = tl.arange(0, BLOCK_N * BLOCK_S)
    n = tl.program_id(0) * BLOCK_N + row // BLOCK_S
    mn = n < N
    if IDENTITY:
        first = n
        deg = mn.to(tl.int32)
    else:
        first = tl.load(start_ptr + n, mask=mn, other=0)
        deg = tl.load(start_ptr + n + 1, mask=mn, other=0) - first
    return row, n, mn, first, deg, tl.max(deg, axis=0)


@triton.jit
def _slot_edges(order_ptr, peer_ptr, row, n, mn, first, deg, s0, IDENTITY: tl.constexpr, BLOCK_S: tl.constexpr):
    """The edge in slot s0 + (row's slot) of each row's receiver (masked past its
    in-degree) and the edge's other end, both read from the ordering (one level of
    loads, not an edge id and then its sender)."""
    slot = s0 + row % BLOCK_S
    me = mn & (slot < deg)
    if IDENTITY:
        e64 = n.to(tl.int64)
        s = e64
    else:
        e64 = tl.load(order_ptr + first + slot, mask=me, other=0).to(tl.int64)
        s = tl.load(peer_ptr + first + slot, mask=me, other=0).to(tl.int64)
    return me, e64, s


_CONV_HEAD = """@triton.jit(do_not_specialize=["N"])
def _conv_kernel(a_ptr, b_ptr, w_ptr, b2_ptr, w2_ptr, a2_ptr, out_ptr, peer_ptr, order_ptr, start_ptr,
                 N, sa0, sa1, sb0, sb1, sw0, sw1, sb20, sb21, sw20, sw21, sa20, sa21, so0,
                 IDENTITY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_U: tl.constexpr, TWO: tl.constexpr, A2: tl.constexpr):
    row, n, mn, first, deg, width = _receiver_tile(start_ptr, N, IDENTITY, BLOCK_N, BLOCK_S)
    u = tl.program_id(2) * BLOCK_U + tl.arange(0, BLOCK_U)
    n_out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_row = out_ptr + n_out.to(tl.int64)[:, None] * so0
    mo = n_out < N
"""


def _slot_loop(peer: str) -> List[str]:
    """The head of a loop over a tile's edge slots, BLOCK_S at a time: (me, e64, peer)
    of the slots in hand, the next slots' loaded at the top of the body (prefetched: in
    flight while this body's gathers and products run, so an iteration waits on one
    level of loads, the gathers, not on the edge ids first); the body ends with
    :func:`_slot_next`."""
    args = "order_ptr, peer_ptr, row, n, mn, first, deg, {}, IDENTITY, BLOCK_S"
    return [f"        me, e64, {peer} = _slot_edges({args.format('0')})",
            "        for s0 in range(0, width, BLOCK_S):",
            f"            me_next, e64_next, {peer}_next = _slot_edges({args.format('s0 + BLOCK_S')})",
            "            mask = me[:, None] & mu[None, :]"]


def _slot_next(peer: str) -> str:
    return f"            me, e64, {peer} = me_next, e64_next, {peer}_next"


def _conv_source(form: "ConvForm") -> str:
    """The conv kernel of one form: a program per (BLOCK_N receivers, output irrep,
    BLOCK_U channels); each of the irrep's components k has an accumulator, the paths
    writing it are summed over the receivers' edges (BLOCK_S at a time) with every
    operand loaded once per edge and the coefficients as literals, then each k is
    reduced over the slots and stored once (no atomics)::

        acc_k += (sum_j c_ijk b[e, j])[:, None] * (a[src, u, i] * w[e, u])

    TWO: the sum of two such products sharing a, (b, w) + (b2, w2) (in the double
    backward), so a is gathered once for both; A2 (with TWO): the second's a-w factor
    is w2 a + w a2, a third product (a2, b2, w) in the same pass."""
    dt = str(form.dtype).removeprefix("torch.")
    lines = [_CONV_HEAD]
    for g, ts in enumerate(form.groups):
        o_off, d_o, mul = form.paths[ts[0]][5:8]
        lines += [f"    {'if' if g == 0 else 'elif'} tl.program_id(1) == {g}:",
                  f"        mu = u < {mul}"]
        lines += [f"        acc{k} = tl.zeros((BLOCK_N * BLOCK_S, BLOCK_U), dtype=tl.{dt})" for k in range(d_o)]
        for t in ts:  # a loop over the edges per path: only one path's operands are live
            a_off, _, b_off, _, w_off, _, _, mul = form.paths[t]
            ents = form.entries[t]
            lines += _slot_loop("s")
            for w_, b_, y, sw, sb in (("w", "b", "y", "sw", "sb"), ("w2", "b2", "z", "sw2", "sb2")):
                if w_ == "w2":
                    lines.append("            if TWO:")
                pad = "    " * (w_ == "w2")
                lines.append(f"            {pad}{w_} = tl.load({w_}_ptr + e64[:, None] * {sw}0 + ({w_off} + u)[None, :]"
                             f".to(tl.int64) * {sw}1, mask=mask, other=0.0)")
                lines += [f"            {pad}{y}{j} = tl.load({b_}_ptr + e64 * {sb}0 + {b_off + j} * {sb}1, mask=me,"
                          " other=0.0)" for j in sorted({e[1] for e in ents})]
            for i in sorted({e[0] for e in ents}):  # one a component live at a time
                lines += [f"            xa = tl.load(a_ptr + s[:, None] * sa0 + ({a_off + i * mul} + u)[None, :]"
                          ".to(tl.int64) * sa1, mask=mask, other=0.0)", "            x = w * xa",
                          "            if TWO:", "                x2 = w2 * xa", "            if A2:",
                          f"                x2 += w * tl.load(a2_ptr + s[:, None] * sa20 + ({a_off + i * mul} + u)[None, :]"
                          ".to(tl.int64) * sa21, mask=mask, other=0.0)"]
                for k in range(d_o):
                    jc = [(j, form.rounded(c)) for ii, j, kk, c in ents if ii == i and kk == k]
                    if jc:
                        lines += [f"            acc{k} += ({' + '.join(_times(c, f'y{j}', dt) for j, c in jc)})[:, None] * x",
                                  "            if TWO:",
                                  f"                acc{k} += ({' + '.join(_times(c, f'z{j}', dt) for j, c in jc)})[:, None] * x2"]
            lines.append(_slot_next("s"))
        lines += [f"        tl.store(o_row + ({o_off + k} + u * {d_o})[None, :], tl.sum(tl.reshape(acc{k}, "
                  f"(BLOCK_N, BLOCK_S, BLOCK_U)), axis=1), mask=mo[:, None] & mu[None, :])" for k in range(d_o)]
    return "\n".join(lines) + "\n"


_EDGE_HEAD = """@triton.jit(do_not_specialize=["E"], do_not_specialize_on_alignment=["dst_ptr"])
def _edge_kernel(a_ptr, b_ptr, w_ptr, g_ptr, gb_ptr, gw_ptr, src_ptr, dst_ptr,
                 E, sa0, sa1, sb0, sb1, sw0, sw1, sg0, sg1, sgb0, sgw0,
                 BLOCK_E: tl.constexpr, BLOCK_U: tl.constexpr, NEED_GB: tl.constexpr, NEED_GW: tl.constexpr):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    me = e < E
    e64 = e.to(tl.int64)
    s = tl.load(src_ptr + e64, mask=me, other=0).to(tl.int64)
    r = tl.load(dst_ptr + e64, mask=me, other=0).to(tl.int64)
"""


def _edge_source(form: "ConvForm") -> str:
    """The per-edge kernel of one form (coefficients as literals)::

        gb[e, B(j)] = sum_{p,u,i,k} c w[e,u] a[src,u,i] g[dst,u,k]
        gw[e, W(u)] = sum_{i,j,k} c b[e,j] a[src,u,i] g[dst,u,k]

    gb sums over every path, so with it one program per edge tile runs every path and
    stores gb once (grid (tiles, 1)); without it a program runs path program_id(1)."""
    dt = str(form.dtype).removeprefix("torch.")
    lines = [_EDGE_HEAD, "    if NEED_GB:"]
    lines += [f"        gb{j} = tl.zeros((BLOCK_E,), dtype=tl.{dt})" for j in range(form.dim_b)]
    for q, ((a_off, _, b_off, _, w_off, o_off, _, mul), ents) in enumerate(zip(form.paths, form.entries)):
        ents = [(i, j, k, form.rounded(c)) for i, j, k, c in ents]
        lines += [f"    if (tl.program_id(1) == {q}) | NEED_GB:",
                  f"        for u0 in range(0, {mul}, BLOCK_U):",
                  "            u = u0 + tl.arange(0, BLOCK_U)",
                  f"            mask = me[:, None] & (u < {mul})[None, :]"]
        lines += [f"            g{k} = tl.load(g_ptr + r[:, None] * sg0 + ({o_off + k * mul} + u)[None, :].to(tl.int64) * sg1,"
                  " mask=mask, other=0.0)" for k in sorted({t[2] for t in ents})]
        lines += ["            if NEED_GB:",
                  f"                w = tl.load(w_ptr + e64[:, None] * sw0 + ({w_off} + u)[None, :].to(tl.int64) * sw1,"
                  " mask=mask, other=0.0)",
                  "            if NEED_GW:",
                  f"                gw = tl.zeros((BLOCK_E, BLOCK_U), dtype=tl.{dt})"]
        lines += [f"                y{j} = tl.load(b_ptr + e64 * sb0 + {b_off + j} * sb1, mask=me, other=0.0)"
                  for j in sorted({t[1] for t in ents})]
        for i in sorted({t[0] for t in ents}):
            lines.append(f"            x = tl.load(a_ptr + s[:, None] * sa0 + ({a_off + i * mul} + u)[None, :]"
                         ".to(tl.int64) * sa1, mask=mask, other=0.0)")
            by_k = _by_k(ents, i)
            # b's values are loaded only with w's gradient, which alone needs t here
            lines += ["            if NEED_GW:", "    " + _t_line(by_k, dt)]
            lines += _weight_grad_lines(by_k, lambda j: f"gb{b_off + j}", dt)
        lines += ["            if NEED_GW:",
                  f"                tl.store(gw_ptr + e64[:, None] * sgw0 + ({w_off} + u)[None, :], gw, mask=mask)"]
    lines.append("    if NEED_GB:")
    lines += [f"        tl.store(gb_ptr + e64 * sgb0 + {j}, gb{j}, mask=me)" for j in range(form.dim_b)]
    return "\n".join(lines) + "\n"


_GRADS_HEAD = """@triton.jit(do_not_specialize=["N"])
def _grads_kernel(a_ptr, b_ptr, w_ptr, g_ptr, a2_ptr, b2_ptr, w2_ptr, ga_ptr, gbp_ptr, gw_ptr,
                  peer_ptr, order_ptr, start_ptr,
                  N, sa0, sa1, sb0, sb1, sw0, sw1, sg0, sg1, sa20, sa21, sb20, sb21, sw20, sw21, sga0, sgbp0, sgw0,
                  IDENTITY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_U: tl.constexpr, NEED_GB: tl.constexpr, NEED_GW: tl.constexpr, DBL: tl.constexpr,
                  A2: tl.constexpr):
    row, n, mn, first, deg, width = _receiver_tile(start_ptr, N, IDENTITY, BLOCK_N, BLOCK_S)
    u = tl.program_id(2) * BLOCK_U + tl.arange(0, BLOCK_U)
    n_out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ga_row = ga_ptr + n_out.to(tl.int64)[:, None] * sga0
    mo = n_out < N
    a_row = a_ptr + n.to(tl.int64)[:, None] * sa0
    a2_row = a2_ptr + n.to(tl.int64)[:, None] * sa20
"""


def _grads_source(form: "ConvForm") -> str:
    """The fused backward of one form: a program per (BLOCK_N senders, input irrep of a,
    BLOCK_U channels) walks its senders' edges (ordered by sender), loads each edge's w,
    b and g[dst] once per path and computes all three gradients from them::

        t_i = sum_k (sum_j c_ijk b[e, j]) g[dst, u, k]
        ga[src, u, i] += w[e, u] t_i                    (in registers, stored once per sender)
        gw[e, W(u)]    = sum_i a[src, u, i] t_i         (stored per edge)
        gbp[e, (channel tile, path, j)] = sum_{i,k} c_ijk sum_u w a_i g_k   (partial sums)

    b's gradient sums over every path and channel, which other programs own: each stores
    its partial sums, reduced afterwards by a fixed map (no atomics).

    DBL: this backward's own backward for incoming gradients (a2, b2, w2) of its three
    outputs (ga, gb, gw), all but g's gradient, in the same walk: with t' = t(b2, g),
    ga += w2 t + w t', gw = a2 t + a t', wx = w a2 + w2 a in gb's sums; without A2 (no
    a2: ga's gradient unused, or the per-edge kernel's backward) the a2 terms drop."""
    dt = str(form.dtype).removeprefix("torch.")
    lines = [_GRADS_HEAD, f"    gbp_row = gbp_ptr + tl.program_id(2) * {form.sum_db}"]
    for g, ts in enumerate(form.a_groups):
        a_off, d_a = form.paths[ts[0]][:2]
        lines += [f"    {'if' if g == 0 else 'elif'} tl.program_id(1) == {g}:",
                  f"        mu = u < {form.paths[ts[0]][7]}"]
        lines += [f"        ga{i} = tl.zeros((BLOCK_N * BLOCK_S, BLOCK_U), dtype=tl.{dt})" for i in range(d_a)]
        for t in ts:  # a loop over the edges per path: only one path's operands are live
            lines += _grads_path_lines(form, t, dt)
        lines += [f"        tl.store(ga_row + ({a_off + i} + u * {d_a})[None, :], tl.sum(tl.reshape(ga{i}, "
                  f"(BLOCK_N, BLOCK_S, BLOCK_U)), axis=1), mask=mo[:, None] & mu[None, :])" for i in range(d_a)]
    return "\n".join(lines) + "\n"


def _grads_path_lines(form: "ConvForm", t: int, dt: str) -> List[str]:
    """The fused backward's loop over the edge slots for path t."""
    a_off, _, b_off, d_b, w_off, o_off, _, mul = form.paths[t]
    ents = [(i, j, k, form.rounded(c)) for i, j, k, c in form.entries[t]]
    lines = _slot_loop("r") + [
        f"            w = tl.load(w_ptr + e64[:, None] * sw0 + ({w_off} + u)[None, :].to(tl.int64) * sw1,"
        " mask=mask, other=0.0)"]
    lines += [f"            y{j} = tl.load(b_ptr + e64 * sb0 + {b_off + j} * sb1, mask=me, other=0.0)"
              for j in sorted({e[1] for e in ents})]
    lines += [f"            g{k} = tl.load(g_ptr + r[:, None] * sg0 + ({o_off + k * mul} + u)[None, :]"
              ".to(tl.int64) * sg1, mask=mask, other=0.0)" for k in sorted({e[2] for e in ents})]
    lines += ["            if DBL:",
              f"                w2 = tl.load(w2_ptr + e64[:, None] * sw20 + ({w_off} + u)[None, :].to(tl.int64) * sw21,"
              " mask=mask, other=0.0)"]
    lines += [f"                z{j} = tl.load(b2_ptr + e64 * sb20 + {b_off + j} * sb21, mask=me, other=0.0)"
              for j in sorted({e[1] for e in ents})]
    lines += ["            if NEED_GW:",
              f"                gw = tl.zeros((BLOCK_N * BLOCK_S, BLOCK_U), dtype=tl.{dt})",
              "            if NEED_GB:"]
    lines += [f"                gbp{j} = tl.zeros((BLOCK_N * BLOCK_S,), dtype=tl.{dt})" for j in range(d_b)]
    for i in sorted({e[0] for e in ents}):
        by_k = _by_k(ents, i)
        lines += [_t_line(by_k, dt), "            if DBL:", "    " + _t_line(by_k, dt, "z", "t2"),
                  f"                ga{i} += w2 * t + w * t2", "            else:", f"                ga{i} += w * t",
                  f"            x = tl.load(a_row + ({a_off + i * mul} + u)[None, :].to(tl.int64) * sa1,"
                  " mask=mask, other=0.0)", "            if A2:",
                  f"                x2 = tl.load(a2_row + ({a_off + i * mul} + u)[None, :].to(tl.int64) * sa21,"
                  " mask=mask, other=0.0)"]
        lines += _weight_grad_lines(by_k, lambda j: f"gbp{j}", dt, dbl=True)
    lines += ["            if NEED_GW:",
              f"                tl.store(gw_ptr + e64[:, None] * sgw0 + ({w_off} + u)[None, :], gw, mask=mask)",
              "            if NEED_GB:"]
    lines += [f"                tl.store(gbp_row + e64 * sgbp0 + {form.b_cols[t] + j}, gbp{j}, mask=me)"
              for j in range(d_b)]
    return lines + [_slot_next("r")]


def _by_k(ents, i: int) -> Dict[int, List[Tuple[int, float]]]:
    """The entries of a component i of a: output component k -> [(j, c)]."""
    by_k: Dict[int, List[Tuple[int, float]]] = {}
    for ii, j, k, c in ents:
        if ii == i:
            by_k.setdefault(k, []).append((j, c))
    return by_k


def _t_line(by_k, dt: str, b: str = "y", name: str = "t") -> str:
    """t = sum_k (sum_j c b_j) g_k, component i's factor of w's and a's gradients (b's
    components loaded as ``b``0, ``b``1, ...)."""
    terms = [f"({' + '.join(_times(c, f'{b}{j}', dt) for j, c in jc)})[:, None] * g{k}" for k, jc in by_k.items()]
    return f"            {name} = {' + '.join(terms)}"


def _weight_grad_lines(by_k, gb_of, dt: str, dbl: bool = False) -> List[str]:
    """Component i's share of w's gradient (gw += x t) and of b's (``gb_of(j)`` += c
    sum_u w x g_k), with x = a's component i and t set; ``dbl``: under the kernel's DBL,
    the double backward's (gw += x2 t + x t2, and w x2 + w2 x for w x; the x2 terms
    only with A2)."""
    if dbl:
        lines = ["            if NEED_GW:", "                if DBL:", "                    gw += x * t2",
                 "                    if A2:", "                        gw += x2 * t",
                 "                else:", "                    gw += x * t", "            if NEED_GB:",
                 "                if DBL:", "                    wx = w2 * x", "                    if A2:",
                 "                        wx += w * x2", "                else:", "                    wx = w * x"]
    else:
        lines = ["            if NEED_GW:", "                gw += x * t", "            if NEED_GB:", "                wx = w * x"]
    for k, jc in by_k.items():
        lines.append(f"                h = tl.sum(wx * g{k}, axis=1)")
        lines += [f"                {gb_of(j)} += {_times(c, 'h', dt)}" for j, c in jc]
    return lines


def _times(c: float, name: str, dt: str) -> str:
    """c * name, the coefficient a literal of the form's dtype (1 left out)."""
    return name if c == 1 else f"{literal(c, dt)} * {name}"


@dataclass
class ConvForm:
    """The paths and nonzero coefficients of one conv form on one device and dtype, and
    its generated kernels."""
    paths: List[Tuple[int, int, int, int, int, int, int, int]]  # a_off, d_a, b_off, d_b, w_off, o_off, d_o, mul
    entries: List[List[Tuple[int, int, int, float]]]  # per path: (i, j, k, c), c in float64
    dim_a: int
    dim_b: int
    dim_o: int
    n_w: int
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self):
        self.max_mul = max((p[7] for p in self.paths), default=1)
        # paths by output irrep (its offset): one program sums a group, so stores are plain
        groups: Dict[int, List[int]] = {}
        for t, p in enumerate(self.paths):
            groups.setdefault(p[5], []).append(t)
        self.groups = list(groups.values())
        self.b_cols = [sum(p[3] for p in self.paths[:t]) for t in range(len(self.paths))]
        self.sum_db = sum(p[3] for p in self.paths)
        # outputs (weight gradient columns) no path writes must be zero-filled; the
        # kernels store every other element
        self.covers_o = sum(self.paths[ts[0]][6] * self.paths[ts[0]][7] for ts in self.groups) == self.dim_o
        self.covers_w = len({w for p in self.paths for w in range(p[4], p[4] + p[7])}) == self.n_w
        self._t: Optional[ConvForm] = None

    @property
    def a_groups(self) -> List[List[int]]:
        """The paths by input irrep (the transposed form's groups): the fused backward's programs."""
        return self.transposed.groups

    @property
    def transposed(self) -> "ConvForm":
        """The form with a and out exchanged (gradient wrt a)."""
        if self._t is None:
            paths = [(o_off, d_o, b_off, d_b, w_off, a_off, d_a, mul)
                     for a_off, d_a, b_off, d_b, w_off, o_off, d_o, mul in self.paths]
            entries = [[(k, j, i, c) for i, j, k, c in ents] for ents in self.entries]
            self._t = ConvForm(paths, entries, self.dim_o, self.dim_b, self.dim_a, self.n_w, self.device, self.dtype)
            self._t._t = self
        return self._t

    def rounded(self, c: float) -> float:
        """A coefficient as the kernels multiply by it: rounded to the form's dtype once."""
        return float(torch.tensor(c, dtype=torch.float64).to(self.dtype))

    @functools.cached_property
    def a_perm(self) -> Optional[torch.Tensor]:
        """The kernels read a component-major (:mod:`.component_major`), every irrep a
        path reads; None where all are scalars."""
        return permutation(((p[0], p[1], p[7]) for p in self.paths), self.dim_a, self.device)

    @functools.cached_property
    def kernel(self):
        """The conv kernel generated for this form (its coefficients as literals)."""
        return jit(_conv_source(self), "_conv_kernel", _receiver_tile=_receiver_tile, _slot_edges=_slot_edges)

    @functools.cached_property
    def edge_kernel(self):
        """The per-edge (b and w gradient) kernel generated for this form."""
        return jit(_edge_source(self), "_edge_kernel")

    @functools.cached_property
    def grads_kernel(self):
        """The fused backward kernel generated for this form."""
        return jit(_grads_source(self), "_grads_kernel", _receiver_tile=_receiver_tile, _slot_edges=_slot_edges)

    @functools.cached_property
    def gb_map(self) -> torch.Tensor:
        """(sum_db, dim_b) 0/1: the fused backward's partial sums of b's gradient, one
        column per (path, j), onto b's components."""
        m = torch.zeros(self.sum_db, self.dim_b, dtype=self.dtype)
        for t, p in enumerate(self.paths):
            m[self.b_cols[t] + torch.arange(p[3]), p[2] + torch.arange(p[3])] = 1
        return m.to(self.device)


def build_form(desc: TPDesc, like: torch.Tensor, path_mask=None) -> ConvForm:
    """The form of a channelwise tensor product, its masked paths dropped (no launch,
    no bytes for them)."""
    s1, s2, so = desc.irreps_in1.slices(), desc.irreps_in2.slices(), desc.irreps_out.slices()
    paths, entries = [], []
    for t, p in enumerate(desc.paths):
        if path_mask is not None and not path_mask[t]:
            continue
        l1, l2, lo = desc.ls(p)
        cg = desc.coefficients(p)
        nz = cg.nonzero().tolist()
        entries.append([(i, j, k, float(cg[i, j, k])) for i, j, k in nz])
        paths.append((s1[p.i_in].start, 2 * l1 + 1, s2[p.i_in2].start, 2 * l2 + 1, p.weight_offset,
                      so[p.i_out].start, 2 * lo + 1, p.mul_in))
    return ConvForm(paths, entries, desc.irreps_in1.dim, desc.irreps_in2.dim, desc.irreps_out.dim,
                    desc.weight_numel, like.device, like.dtype)


@dataclass
class Segments:
    """The edges grouped by one end: ``order`` the edge ids sorted (stably) by it, node n
    owning ``order[start[n]:start[n + 1]]``, and ``peer`` the other end of each edge in
    that order (the kernels read an edge's id and its sender together, not one after
    the other). Device ops only (no host sync)."""
    order: torch.Tensor
    start: torch.Tensor
    peer: torch.Tensor

    @staticmethod
    def build(ends: torch.Tensor, others: torch.Tensor, n: int) -> "Segments":
        order = torch.argsort(ends, stable=True)
        nodes = torch.arange(n + 1, device=ends.device, dtype=ends.dtype)
        start = torch.searchsorted(ends.index_select(0, order), nodes)
        return Segments(order.to(torch.int32), start.to(torch.int32), others.index_select(0, order).to(torch.int32))


@dataclass
class Graph:
    """The edges of one call: senders, receivers, their node counts and the cache of
    their orderings (``rows`` names src's and dst's rows of edge_index there).
    ``identity``: edge e joins node e to node e (the per-edge product)."""
    src: torch.Tensor
    dst: torch.Tensor
    n_src: int
    n_dst: int
    cache: dict
    rows: Tuple[int, int] = (0, 1)
    identity: bool = False

    def receivers(self) -> Segments:
        key = ("receivers", self.rows[1], self.n_dst)
        if key not in self.cache:
            self.cache[key] = Segments.build(self.dst, self.src, self.n_dst)
        return self.cache[key]

    @property
    def transposed(self) -> "Graph":
        return Graph(self.dst, self.src, self.n_dst, self.n_src, self.cache, self.rows[::-1], self.identity)


def _ordering(segments, graph: Graph):
    """(order, start, peer) for the kernels: ``segments()``'s, or for the per-edge
    product (no ordering to read) any int32 pointers."""
    if graph.identity:
        return graph.src, graph.src, graph.src  # unread
    seg = segments()
    return seg.order, seg.start, seg.peer


def _block_u(form: ConvForm, most: int) -> int:
    return min(most, triton.next_power_of_2(form.max_mul))


_BLOCK = 32  # edges per program (tile rows)
_SLOTS = 8  # a receiver's edges per tile: MACE's have ~20-60 (r_max 5-6 A)


def _conv_raw(form: ConvForm, a, b, w, graph: Graph, b2=None, w2=None, a2=None) -> torch.Tensor:
    """The conv of (a, b, w), plus that of (a, b2, w2) where given, plus that of (a2, b2,
    w) where a2 is given too (one launch)."""
    n_out = graph.n_dst
    out = (a.new_empty if form.covers_o else a.new_zeros)(n_out, form.dim_o)
    if not form.paths or n_out == 0:
        return out
    order, start, peer = _ordering(graph.receivers, graph)
    a = component_major(a, form.a_perm)
    two, three = b2 is not None, a2 is not None
    b2, w2 = (b2, w2) if two else (b, w)  # unread without TWO: any pointers with strides
    a2 = component_major(a2, form.a_perm) if three else a
    bu = _block_u(form, 32 if two else 64)  # two products' operands: half the channels a tile
    slots = 1 if graph.identity else _SLOTS
    grid = (triton.cdiv(n_out, _BLOCK // slots), len(form.groups), triton.cdiv(form.max_mul, bu))
    form.kernel[grid](a, b, w, b2, w2, a2, out, peer, order, start,
                      n_out, a.stride(0), a.stride(1), b.stride(0), b.stride(1), w.stride(0), w.stride(1),
                      b2.stride(0), b2.stride(1), w2.stride(0), w2.stride(1), a2.stride(0), a2.stride(1),
                      out.stride(0), IDENTITY=graph.identity, BLOCK_N=_BLOCK // slots, BLOCK_S=slots,
                      BLOCK_U=bu, TWO=two, A2=three, num_warps=8)
    return out


def _edge_raw(form: ConvForm, a, b, w, g, graph: Graph, need_b: bool, need_w: bool):
    E = graph.src.shape[0]
    # a launch stores every gb element (zeros where no path reads b); gw only where paths cover it
    gb = (a.new_empty if form.paths else a.new_zeros)(E, form.dim_b) if need_b else None
    gw = (a.new_empty if form.covers_w else a.new_zeros)(E, form.n_w) if need_w else None
    if E == 0 or not form.paths or not (need_b or need_w):
        return gb, gw
    a, g = component_major(a, form.a_perm), component_major(g, form.transposed.a_perm)
    b_ = b if b is not None else a  # unused operand: any pointer with strides
    w_ = w if w is not None else a
    gb_ = gb if gb is not None else a
    gw_ = gw if gw is not None else a
    # channel tiles of 32 over 8 warps: with 64 or 4 warps the kernel taking both
    # gradients spills on sm_90 (tests/ops/test_gpu_proxy_aot.py)
    grid = (triton.cdiv(E, _BLOCK), 1 if need_b else len(form.paths))
    form.edge_kernel[grid](a, b_, w_, g, gb_, gw_, graph.src, graph.dst, E,
                           a.stride(0), a.stride(1), b_.stride(0), b_.stride(1), w_.stride(0), w_.stride(1),
                           g.stride(0), g.stride(1), gb_.stride(0), gw_.stride(0),
                           BLOCK_E=_BLOCK, BLOCK_U=_block_u(form, 32), NEED_GB=need_b, NEED_GW=need_w,
                           num_warps=8 if need_b else 4)
    return gb, gw


def _grads_raw(form: ConvForm, a, b, w, g, graph: Graph, need_b: bool, need_w: bool, dbl=None):
    """(ga, gb, gw) of the conv form for output gradient g, one launch (gb, gw None
    unless asked for); with ``dbl`` = (Ga, Gb, Gw), incoming gradients of those three,
    a's, b's and w's gradients of <Ga, ga> + <Gb, gb> + <Gw, gw> instead (both asked for;
    Ga may be None: no such term)."""
    n_a, E = graph.n_src, graph.src.shape[0]
    ga = (a.new_empty if form.transposed.covers_o else a.new_zeros)(n_a, form.dim_a)
    gw = (a.new_empty if form.covers_w else a.new_zeros)(E, form.n_w) if need_w else None
    if not form.paths or n_a == 0:
        return ga, (a.new_zeros(E, form.dim_b) if need_b else None), gw  # ga: zeros, no path covers it
    has_a2 = dbl is not None and dbl[0] is not None
    # with 64 channels a tile, 253 registers on sm_90 (Triton 3.7.1); the double backward
    # with a2 at 32 spills at 8 warps (128 registers), hence 16, and 4 warps: at 8,
    # Triton 3.6.0 (the GPU image's) spilled 8 B in one of SevenNet-0's forms. float64
    # values take two registers: with an l = 2 input (MACE-MP-0 large), 32 channels spill
    # in the edge loop (tests/ops/test_gpu_proxy_aot.py)
    wide = form.dtype == torch.float64 and max(form.paths[ts[0]][1] for ts in form.a_groups) >= 5
    bu = _block_u(form, 16 if has_a2 or wide else 32)
    n_ct = triton.cdiv(form.max_mul, bu)
    gbp = a.new_empty(E, n_ct * form.sum_db) if need_b else None
    order, start, peer = _ordering(graph.transposed.receivers, graph)  # the edges by sender
    slots = 1 if graph.identity else _SLOTS
    a, g = component_major(a, form.a_perm), component_major(g, form.transposed.a_perm)
    a2 = component_major(dbl[0], form.a_perm) if has_a2 else a  # operands not given: unread
    b2, w2 = dbl[1:] if dbl else (b, w)
    gbp_ = gbp if gbp is not None else a  # an output not asked for: any pointer with strides
    gw_ = gw if gw is not None else a
    grid = (triton.cdiv(n_a, _BLOCK // slots), len(form.a_groups), n_ct)
    form.grads_kernel[grid](a, b, w, g, a2, b2, w2, ga, gbp_, gw_, peer, order, start,
                            n_a, a.stride(0), a.stride(1), b.stride(0), b.stride(1), w.stride(0), w.stride(1),
                            g.stride(0), g.stride(1), a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
                            w2.stride(0), w2.stride(1), ga.stride(0), gbp_.stride(0), gw_.stride(0),
                            IDENTITY=graph.identity, BLOCK_N=_BLOCK // slots, BLOCK_S=slots, BLOCK_U=bu,
                            NEED_GB=need_b, NEED_GW=need_w, DBL=dbl is not None, A2=has_a2,
                            num_warps=4 if has_a2 else 8)
    gb = gbp.view(E, n_ct, form.sum_db).sum(1) @ form.gb_map if need_b else None
    return ga, gb, gw


def _second_raw(form, graph, a, b, w, g, Ga, Gb, Gw, need):
    """(da, db, dw, dg) of <Ga, ga> + <Gb, gb> + <Gw, gw>, (ga, gb, gw) the conv form's
    gradients for output gradient g (Ga None: no such term), in two launches: the fused
    backward's kernel with DBL by sender (a's, b's, w's) and the conv kernel with three
    products by receiver (g's: T(a, Gb, w) + T(a, b, Gw) + T(Ga, b, w))."""
    da, db, dw = _grads_raw(form, a, b, w, g, graph, need[1], need[2], dbl=(Ga, Gb, Gw))
    return (da if need[0] else None), db, dw, _conv_raw(form, a, Gb, w, graph, b, Gw, Ga)


def _fused_second(need, Gb, Gw) -> bool:
    """Whether :func:`_second_raw` serves a backward of the conv's gradients: force
    training's (g's gradient wanted and b's or w's: a training step asks for w's alone,
    b being a function of the positions only; both of b's and w's gradients used), not
    differentiated further (its launches have no autograd of their own)."""
    return not torch.is_grad_enabled() and Gb is not None and Gw is not None and need[3] and (need[1] or need[2])


def _conv_vjp(form, graph, a, b, w, g, need):
    """(ga, gb, gw): the conv's gradients for output gradient g, those in ``need``
    (a, b, w) computed, the others None. All three from one fused launch; a alone by
    the transposed conv, b and w alone by the per-edge kernel."""
    need_a, need_b, need_w = need
    if need_a and (need_b or need_w):
        return _Grads.apply(a, b, w, g, form, graph, bool(need_b), bool(need_w))
    ga = _Conv.apply(g, b, w, form.transposed, graph.transposed) if need_a else None
    gb, gw = _edge(form, a, b, w, g, graph, need_b, need_w) if need_b or need_w else (None, None)
    return ga, gb, gw


def _edge_vjp(form, graph, a, b, w, g, Gb, Gw, need):
    """(da, db, dw, dg) of <Gb, gb> + <Gw, gw>, (gb, gw) = the per-edge gradients of the
    conv form; those in ``need`` (a, b, w, g) computed, the others None. gb and gw are
    linear in (w, a, g) and (b, a, g): each term is one of them with an operand replaced
    by its incoming gradient."""
    na, nb, nw, ng = need
    da = db = dw = dg = None
    pairs = ((Gb, w), (b, Gw))  # gb's and gw's terms: one launch for both where both come
    if na:
        da = _convs(form.transposed, graph.transposed, g, pairs)
    if ng:
        dg = _convs(form, graph, a, pairs)
    want_b, want_w = nb and Gw is not None, nw and Gb is not None
    if want_b or want_w:  # one launch: gb reads only the w operand (here Gw), gw only the b one (Gb)
        db, dw = _edge(form, a, Gb if want_w else b, Gw if want_b else w, g, graph, want_b, want_w)
    return da, db, dw, dg


class _Conv(torch.autograd.Function):
    """The conv of (a, b, w), plus that of (a, b2, w2) where given (one launch)."""

    @staticmethod
    def forward(ctx, a, b, w, form, graph, b2=None, w2=None):
        track(ctx, a, b, w, form, graph, b2, w2)
        ctx.save_for_backward(a, b, w, b2, w2)
        ctx.form, ctx.graph = form, graph
        return _conv_raw(form, a, b, w, graph, b2, w2)

    @staticmethod
    def backward(ctx, g):
        a, b, w, b2, w2 = ctx.saved_tensors
        ga, gb, gw = _conv_vjp(ctx.form, ctx.graph, a, b, w, g, [needed(ctx, i) for i in range(3)])
        gb2 = gw2 = None
        if b2 is not None:  # the second product's share (its a gradient added to the first's)
            ga2, gb2, gw2 = _conv_vjp(ctx.form, ctx.graph, a, b2, w2, g, [needed(ctx, i) for i in (0, 5, 6)])
            ga = summed(ga, ga2)
        return (ga, gb, gw, None, None, gb2, gw2)[:len(ctx.needs_input_grad)]


def _convs(form, graph, a, pairs):
    """The sum of the convs of (a, b, w) over the two ``pairs`` (a None b or w: no term),
    in one launch; None if neither pair is whole."""
    whole = [(b, w) for b, w in pairs if b is not None and w is not None]
    if not whole:
        return None
    return _Conv.apply(a, *whole[0], form, graph, *(whole[1] if len(whole) == 2 else (None, None)))


class _Edge(torch.autograd.Function):
    """(gb, gw) of the conv form for output gradient g; an output not asked for is an
    empty placeholder."""

    @staticmethod
    def forward(ctx, a, b, w, g, form, graph, need_b, need_w):
        track(ctx, a, b, w, g)
        ctx.save_for_backward(a, b, w, g)
        ctx.form, ctx.graph, ctx.need = form, graph, (need_b, need_w)
        gb, gw = _edge_raw(form, a, b if need_w else None, w if need_b else None, g, graph, need_b, need_w)
        empty = a.new_empty(0)
        return (gb if need_b else empty), (gw if need_w else empty)

    @staticmethod
    def backward(ctx, Gb, Gw):
        a, b, w, g = ctx.saved_tensors
        Gb = Gb if ctx.need[0] else None
        Gw = Gw if ctx.need[1] else None
        need = [needed(ctx, i) for i in range(4)]
        if _fused_second(need, Gb, Gw):
            return (*_second_raw(ctx.form, ctx.graph, a, b, w, g, None, Gb, Gw, need), None, None, None, None)
        return (*_edge_vjp(ctx.form, ctx.graph, a, b, w, g, Gb, Gw, need), None, None, None, None)


class _Grads(torch.autograd.Function):
    """(ga, gb, gw) of the conv form for output gradient g, one fused launch; gb or gw
    not asked for is None. ga is the transposed conv of (g, b, w) and (gb, gw) the
    per-edge gradients of (a, b, w, g): the backward is the sum of theirs."""

    @staticmethod
    def forward(ctx, a, b, w, g, form, graph, need_b, need_w):
        track(ctx, a, b, w, g)
        ctx.save_for_backward(a, b, w, g)
        ctx.form, ctx.graph, ctx.need = form, graph, (need_b, need_w)
        ctx.set_materialize_grads(False)
        return _grads_raw(form, a, b, w, g, graph, need_b, need_w)

    @staticmethod
    def backward(ctx, Ga, Gb, Gw):
        a, b, w, g = ctx.saved_tensors
        form, graph = ctx.form, ctx.graph
        need = [needed(ctx, i) for i in range(4)]
        if _fused_second(need, Gb, Gw):
            return (*_second_raw(form, graph, a, b, w, g, Ga, Gb, Gw, need), None, None, None, None)
        da, db, dw, dg = _edge_vjp(form, graph, a, b, w, g, Gb, Gw, need)
        if Ga is not None:  # ga = conv(g, b, w) of the transposed form and graph
            tg, tb, tw = _conv_vjp(form.transposed, graph.transposed, g, b, w, Ga, (need[3], need[1], need[2]))
            db, dw, dg = summed(db, tb), summed(dw, tw), summed(dg, tg)
        return da, db, dw, dg, None, None, None, None


def _edge(form, a, b, w, g, graph, need_b, need_w):
    gb, gw = _Edge.apply(a, b, w, g, form, graph, bool(need_b), bool(need_w))
    return (gb if need_b else None), (gw if need_w else None)


def _path_key(desc: TPDesc, path_mask) -> Optional[Tuple[bool, ...]]:
    if path_mask is None:
        return None
    mask = tuple(bool(v) for v in (path_mask.tolist() if torch.is_tensor(path_mask) else path_mask))
    if len(mask) != len(desc.paths):
        raise ValueError(f"path_mask has {len(mask)} entries, the product has {len(desc.paths)} paths")
    return None if all(mask) else mask


def _form(desc: TPDesc, like: torch.Tensor, path_mask) -> ConvForm:
    key = _path_key(desc, path_mask)
    return desc.const(f"triton_conv_form:{key}", like, lambda: build_form(desc, like, key))


def _check(desc: TPDesc, a, b, w):
    for name, t, dim in (("node_feats", a, desc.blocks_in1.dim), ("edge_attrs", b, desc.blocks_in2.dim),
                         ("tp_weights", w, desc.weight_numel)):
        if t.dim() != 2 or t.shape[1] != dim:
            raise ValueError(f"{name} must have shape (*, {dim}), got {tuple(t.shape)}")
        if t.dtype != a.dtype or t.device != a.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device}, node_feats {a.dtype} on {a.device}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"float32 or float64 expected, got {a.dtype}")
    if w.shape[0] != b.shape[0]:
        raise ValueError(f"tp_weights has {w.shape[0]} rows, edge_attrs {b.shape[0]}")


def conv(desc: TPDesc, node_feats: torch.Tensor, edge_attrs: torch.Tensor, tp_weights: torch.Tensor,
         edge_index: torch.Tensor, path_mask=None) -> torch.Tensor:
    """The fused convolution in one kernel: (N, dim_out) = sum over edges e with
    edge_index[1, e] = n of the channelwise product of node_feats[edge_index[0, e]],
    edge_attrs[e] and tp_weights[e]. ``path_mask`` (bool per ``desc.paths``) drops
    paths: no work for them, zero output and zero gradient of their weights."""
    _check(desc, node_feats, edge_attrs, tp_weights)
    if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.shape[1] != edge_attrs.shape[0]:
        raise ValueError(f"edge_index must have shape (2, {edge_attrs.shape[0]}), got {tuple(edge_index.shape)}")
    n = node_feats.shape[0]
    graph = Graph(edge_index[0].contiguous(), edge_index[1].contiguous(), n, n, cache_of(edge_index))
    return _Conv.apply(node_feats, edge_attrs, tp_weights, _form(desc, node_feats, path_mask), graph)


def channelwise_tp(desc: TPDesc, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
                   path_mask=None) -> torch.Tensor:
    """Per-edge messages (no gather or scatter): the conv form with src = dst = identity."""
    _check(desc, x1, x2, weight)
    if x1.shape[0] != x2.shape[0]:
        raise ValueError(f"x1 has {x1.shape[0]} rows, x2 {x2.shape[0]}")
    e = x1.shape[0]
    idx = torch.arange(e, device=x1.device)
    graph = Graph(idx, idx, e, e, {}, identity=True)
    return _Conv.apply(x1, x2, weight, _form(desc, x1, path_mask), graph)
