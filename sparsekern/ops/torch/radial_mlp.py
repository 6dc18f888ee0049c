"""e3nn's ``FullyConnectedNet`` (the radial MLPs) on torch.

With SiLU activations (MACE's and SevenNet's), the network is one autograd Function
whose backward is another with a hand-written backward: every scalar factor of e3nn's
layers folded into one scale per weight, no autograd node per multiply, SiLU's second
derivative in a few ops (forward / +backward / +double backward 17 / 53 / 258 -> 8 / 38 /
192 aten ops, MACE-MP-0 medium's MLP). Other activations run e3nn's operations as they are."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch.nn.functional import silu

from ...delta_slot import effective
from ..descriptors import RadialDesc
from ..grads import needed, summed, track
from ..tensor_cache import derived
from .silu import silu_grad, silu_second


def radial_mlp(desc: RadialDesc, x: torch.Tensor, weights: Sequence[torch.Tensor],
               deltas: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    scales = desc.silu_scales
    if scales is None:
        return _reference(desc, x, [effective(w, d) for w, d in zip(weights, deltas)])
    # W0 + dW, scaled: once while frozen (a calculator's inference, an adapter), else per call
    vs = derived([*weights, *(d for d in deltas if d is not None)], ("radial_mlp_scaled", scales),
                 lambda: torch._foreach_mul([effective(w, d) for w, d in zip(weights, deltas)], list(scales)))
    lead = x.shape[:-1]
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = _MLP.apply(flat, *vs)
    return y if x.dim() == 2 else y.reshape(*lead, y.shape[-1])


def _reference(desc: RadialDesc, x: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    """e3nn's ``_Layer`` operation for operation."""
    for h_in, (act, var_in, var_out), w in zip(desc.hs, desc.layers, weights):
        if act is not None:
            x = act(x @ (w / (h_in * var_in) ** 0.5)) * var_out ** 0.5
        else:
            x = x @ (w / (h_in * var_in / var_out) ** 0.5)
    return x


def _hidden(x: torch.Tensor, vs: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The pre-activations z_l and the activations a_l = silu(z_l) of the hidden layers."""
    zs, acts = [], []
    a = x
    for v in vs[:-1]:
        zs.append(a.mm(v))
        a = silu(zs[-1])
        acts.append(a)
    return zs, acts


class _MLP(torch.autograd.Function):
    """y = silu(...silu(x V_0)...) V_{L-1}, the scales already in the weights V_l."""

    @staticmethod
    def forward(ctx, x, *vs):
        track(ctx, x, *vs)
        zs, acts = _hidden(x, vs)
        ctx.save_for_backward(x, *vs)
        ctx.zs, ctx.acts = zs, acts
        return (acts[-1] if acts else x).mm(vs[-1])

    @staticmethod
    def backward(ctx, gy):
        x, *vs = ctx.saved_tensors
        need = tuple(needed(ctx, i) for i in range(1 + len(vs)))
        if not any(need):
            return (None,) * len(need)
        return _MLPGrad.apply(gy, x, need, (ctx.zs, ctx.acts), *vs)


def _mlp_grads(gy, x, vs, zs, acts, need):
    """The backward sweep: (gx, gV_l), None where not needed, and the cotangents g_l of
    every layer's output and ga_l of every hidden activation (for the double backward)."""
    L = len(vs)
    grads: List[Optional[torch.Tensor]] = [None] * (1 + L)
    gs: List[torch.Tensor] = [None] * L  # g_l: cotangent of z_l (of y for the last)
    gas: List[torch.Tensor] = [None] * (L - 1)  # ga_l: cotangent of a_l
    g = gy
    for l in range(L - 1, -1, -1):
        gs[l] = g
        if need[1 + l]:
            grads[1 + l] = (acts[l - 1] if l else x).t().mm(g)
        if l == 0 and not need[0]:
            break
        ga = g.mm(vs[l].t())
        if l == 0:
            grads[0] = ga
        else:
            gas[l - 1] = ga
            g = silu_grad(ga, zs[l - 1])
    return grads, gs, gas


class _MLPGrad(torch.autograd.Function):
    """_MLP's backward, (gy, x, V_l) -> (gx, gV_l), with its own backward: the
    tangents of gx and gV_l pushed forward through the backward sweep, then back through
    the network (the hidden layers' dependence on x and V_l)."""

    @staticmethod
    def forward(ctx, gy, x, need, hidden, *vs):
        track(ctx, gy, x, need, hidden, *vs)
        ctx.set_materialize_grads(False)  # an unused output's cotangent stays None
        zs, acts = hidden
        grads, gs, gas = _mlp_grads(gy, x, vs, zs, acts, need)
        ctx.save_for_backward(gy, x, *vs)
        ctx.need, ctx.zs, ctx.acts, ctx.gs, ctx.gas = need, zs, acts, gs, gas
        return tuple(grads)

    @staticmethod
    def backward(ctx, *cot):
        gy, x, *vs = ctx.saved_tensors
        if torch.is_grad_enabled():  # a third derivative: z_l, g_l as functions of the inputs
            zs, acts = _hidden(x, vs)
            _, gs, gas = _mlp_grads(gy, x, vs, zs, acts, ctx.need)
        else:
            zs, acts, gs, gas = ctx.zs, ctx.acts, ctx.gs, ctx.gas
        L = len(vs)
        nx, nv = needed(ctx, 1), [needed(ctx, 4 + l) for l in range(L)]
        out: List[Optional[torch.Tensor]] = [None] * (4 + L)  # gy, x, need, hidden, V_l
        gv: List[Optional[torch.Tensor]] = [None] * L
        adj_a: List[Optional[torch.Tensor]] = [None] * (L - 1)  # adjoints of a_l, of z_l
        adj_z: List[Optional[torch.Tensor]] = [None] * (L - 1)
        adj_x = None
        A = cot[0]  # the adjoint of ga_{l-1} (of gx for l = 0)
        for l in range(L):  # ga_{l-1} = g_l V_l^T, gV_l = a_{l-1}^T g_l, g_l = ga_l * silu'(z_l)
            a_prev = acts[l - 1] if l else x
            adj_g = None
            if A is not None:
                adj_g = A.mm(vs[l])
                if nv[l]:
                    gv[l] = A.t().mm(gs[l])
            if cot[1 + l] is not None:
                adj_g = summed(adj_g, a_prev.mm(cot[1 + l]))
                if l:
                    adj_a[l - 1] = summed(adj_a[l - 1], gs[l].mm(cot[1 + l].t()))
                elif nx:
                    adj_x = gs[0].mm(cot[1].t())
            if l == L - 1:
                out[0] = adj_g
            elif adj_g is not None:
                A = silu_grad(adj_g, zs[l])
                adj_z[l] = silu_second(adj_g * gas[l], zs[l])
            else:
                A = None
        dz = None  # the adjoint of z_l, summed over both of its uses
        for l in range(L - 2, -1, -1):
            if dz is not None:  # z_{l+1} = a_l V_{l+1}
                if nv[l + 1]:
                    gv[l + 1] = summed(gv[l + 1], acts[l].t().mm(dz))
                adj_a[l] = summed(adj_a[l], dz.mm(vs[l + 1].t()))
            dz = adj_z[l]
            if adj_a[l] is not None:
                dz = summed(dz, silu_grad(adj_a[l], zs[l]))
        if dz is not None:  # z_0 = x V_0
            if nv[0]:
                gv[0] = summed(gv[0], x.t().mm(dz))
            if nx:
                adj_x = summed(adj_x, dz.mm(vs[0].t()))
        out[1] = adj_x
        out[4:] = gv
        return tuple(out)
