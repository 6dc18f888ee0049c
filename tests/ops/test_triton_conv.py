"""Triton fused conv against the torch layer (ChannelwiseConv / ChannelwiseTP): outputs,
gradients and second derivatives, path mask, zero edges, non-contiguous inputs, paths
sharing an output, receivers with more edges than a tile's slots, the edge orderings
built once per graph.
Runs on CPU under TRITON_INTERPRET=1 (tiny shapes: the interpreter is slow)."""

import pytest
import torch

from helpers import TOL, random_o3, rel_err, triton_device, uvu_tp

DEVICE = triton_device()  # before the kernels are imported

from e3nn import o3  # noqa: E402

import sparsekern  # noqa: E402,F401
from sparsekern.layers import ChannelwiseConv, ChannelwiseTP  # noqa: E402
from sparsekern.ops.triton import conv as triton_conv_module  # noqa: E402
from sparsekern.ops.triton.conv import build_form, channelwise_tp as triton_tp, conv as triton_conv  # noqa: E402


def make(irreps1, irreps2, lmax_out, n, e, dtype, seed=0):
    conv = ChannelwiseConv.from_e3nn(uvu_tp(irreps1, irreps2, lmax_out, dtype))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, conv.irreps_in1.dim, generator=g, dtype=dtype).to(DEVICE)
    y = torch.randn(e, conv.irreps_in2.dim, generator=g, dtype=dtype).to(DEVICE)
    w = torch.randn(e, conv.weight_numel, generator=g, dtype=dtype).to(DEVICE)
    ei = torch.randint(0, n, (2, e), generator=g).to(DEVICE)
    return conv.to(DEVICE), x, y, w, ei


# l <= 3 everywhere (MACE's sh and hidden irreps), few channels
BIG = ("3x0e+2x1o+2x2e+1x3o", "0e+1o+2e+3o", 3)
TINY = ("2x0e+2x1o", "0e+1o", 1)


def force_like(fn, x, y, w):
    """Gradients, and gradients of a loss of the gradients (force training's pattern)."""
    args = [t.detach().clone().requires_grad_() for t in (x, y, w)]
    out = fn(*args)
    grads = torch.autograd.grad((out * out.detach().cos()).sum() + (out ** 2).sum(), args, create_graph=True)
    loss = sum((gi * gi.detach().sin()).sum() + (gi ** 2).sum() for gi in grads)
    return [out.detach()] + [gi.detach() for gi in grads] + list(torch.autograd.grad(loss, args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward_double_backward_match_torch(dtype):
    conv, x, y, w, ei = make(*BIG, n=4, e=9, dtype=dtype)
    ours = force_like(lambda a, b, c: triton_conv(conv.desc, a, b, c, ei), x, y, w)
    ref = force_like(lambda a, b, c: conv(a, b, c, ei), x, y, w)
    for name, a, b in zip(["out", "dx", "dy", "dw", "ddx", "ddy", "ddw"], ours, ref):
        assert a.dtype == dtype and a.shape == b.shape
        assert rel_err(a, b) <= TOL[dtype], name


def test_double_backward_of_edge_gradients_alone():
    """Forces through b and w only (MACE's first layer: the node features do not depend on
    the positions), then a loss of them differentiated wrt everything: the per-edge
    kernel's own backward, fused (two launches), against the torch layer."""
    conv, x, y, w, ei = make(*BIG, n=4, e=9, dtype=torch.float64)

    def run(fn):
        a, b, c = [t.detach().clone().requires_grad_() for t in (x, y, w)]
        out = fn(a, b, c)
        gb, gw = torch.autograd.grad((out * out.detach().cos()).sum() + (out ** 2).sum(), (b, c), create_graph=True)
        loss = (gb * gb.detach().sin()).sum() + (gw ** 2).sum()
        return [gb.detach(), gw.detach(), *torch.autograd.grad(loss, (a, b, c))]
    ours = run(lambda a, b, c: triton_conv(conv.desc, a, b, c, ei))
    ref = run(lambda a, b, c: conv(a, b, c, ei))
    for name, a, b in zip(["gb", "gw", "dda", "ddb", "ddw"], ours, ref):
        assert rel_err(a, b) <= 1e-12, name


@pytest.mark.parametrize("node_forces", [True, False])
def test_double_backward_without_the_edge_attributes(node_forces, monkeypatch):
    """A training step differentiates the loss of the forces wrt the trained tensors only
    (``finetune.backward``), and the edge attributes depend on the positions alone: the
    fused double backward without b's gradient (two launches still), against the torch
    layer, with the node features' forces and without."""
    conv, x, y, w, ei = make(*BIG, n=4, e=9, dtype=torch.float64)
    fused = []
    second = triton_conv_module._second_raw
    monkeypatch.setattr(triton_conv_module, "_second_raw", lambda *a: fused.append(a[-1]) or second(*a))

    def run(fn):
        a, b, c = [t.detach().clone().requires_grad_() for t in (x, y, w)]
        out = fn(a, b, c)
        wrt = (a, b, c) if node_forces else (b, c)
        grads = torch.autograd.grad((out * out.detach().cos()).sum() + (out ** 2).sum(), wrt, create_graph=True)
        loss = sum((gi * gi.detach().sin()).sum() + (gi ** 2).sum() for gi in grads)
        return list(torch.autograd.grad(loss, (a, c)))
    ours = run(lambda a, b, c: triton_conv(conv.desc, a, b, c, ei))
    assert [need[1:] for need in fused] == [[False, True, True]]  # b's not computed
    ref = run(lambda a, b, c: conv(a, b, c, ei))
    for name, a, b in zip(["dda", "ddw"], ours, ref):
        assert rel_err(a, b) <= 1e-12, name


@pytest.mark.parametrize("node_forces", [True, False])
def test_double_backward_by_finite_differences(node_forces):
    """The fused double backward (used when it is not differentiated further) against a
    central difference of the loss of the first-order gradients along a random
    direction, float64: with the node features' gradient in the loss (the fused
    backward's own backward) and without (the per-edge kernel's)."""
    conv, x, y, w, ei = make(*BIG, n=4, e=9, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    dirs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, y, w)]
    v = torch.randn(4, conv.irreps_out.dim, generator=g, dtype=torch.float64)
    u = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, y, w)]

    def loss(a, b, c):
        out = triton_conv(conv.desc, a, b, c, ei)
        wrt = (a, b, c) if node_forces else (b, c)
        grads = torch.autograd.grad((out * v).sum() + (out ** 2).sum(), wrt, create_graph=True)
        return sum((gi * ui).sum() + (gi ** 2).sum() for gi, ui in zip(grads, u[3 - len(grads):]))

    args = [t.clone().requires_grad_() for t in (x, y, w)]
    analytic = sum((gi * d).sum() for gi, d in zip(torch.autograd.grad(loss(*args), args), dirs))
    eps = 1e-6
    with torch.enable_grad():
        plus, minus = (loss(*[(t + s * eps * d).requires_grad_() for t, d in zip((x, y, w), dirs)]).detach()
                       for s in (1, -1))
    assert abs(analytic - (plus - minus) / (2 * eps)) <= 1e-6 * abs(analytic)


def test_channel_tiles():
    """40 channels: several channel tiles with a ragged last one (16 or 32 channels a
    tile: the fused backward's partial sums of b's gradient, one row per tile), through
    the double backward, against the torch layer."""
    conv, x, y, w, ei = make("40x0e+40x1o", "0e+1o+2e", 2, n=5, e=12, dtype=torch.float64)
    ours = force_like(lambda a, b, c: triton_conv(conv.desc, a, b, c, ei), x, y, w)
    ref = force_like(lambda a, b, c: conv(a, b, c, ei), x, y, w)
    for name, a, b in zip(["out", "dx", "dy", "dw", "ddx", "ddy", "ddw"], ours, ref):
        assert rel_err(a, b) <= 1e-12, name


def test_only_nonzero_cg_entries():
    conv, *_ = make(*BIG, n=1, e=1, dtype=torch.float64)
    form = build_form(conv.desc, torch.empty(0, dtype=torch.float64))
    dense = sum(d_a * d_b * d_o for _, d_a, _, d_b, _, _, d_o, _ in form.paths)
    entries = [c for ents in form.entries for *_, c in ents]
    assert 0 < len(entries) < dense / 2 and all(c != 0 for c in entries)
    assert len(form.transposed.paths) == len(form.paths) and form.transposed.transposed is form


def test_kernels_generated_per_form():
    """Each form gets kernels with its coefficients as literals (no table arguments);
    equal forms share them, another form, dtype or its transpose gets its own."""
    conv, *_ = make(*BIG, n=1, e=1, dtype=torch.float64)
    f64 = build_form(conv.desc, torch.empty(0, dtype=torch.float64))
    f32 = build_form(conv.desc, torch.empty(0, dtype=torch.float32))
    assert build_form(conv.desc, torch.empty(0, dtype=torch.float64)).kernel is f64.kernel
    kernels = [f.kernel for f in (f64, f32, f64.transposed)] + [f64.edge_kernel, f64.grads_kernel]
    assert len({id(k) for k in kernels}) == len(kernels)
    for k in kernels:
        assert not {"meta_ptr", "kstart_ptr", "ec_ptr"} & set(k.arg_names), k.arg_names


def test_gradcheck_gradgradcheck():
    gradcheck_conv(triton_conv)


def gradcheck_conv(op) -> None:
    """gradcheck and gradgradcheck of a back end's conv op (float64, tiny)."""
    conv, x, y, w, ei = make(*TINY, n=3, e=5, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, y, w)]
    fn = lambda a, b, c: op(conv.desc, a, b, c, ei)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def test_third_derivatives():
    """gradgradcheck of the force-training gradient: the double backward's own backward
    (the per-edge kernel fed Gb and Gw at once, and the two-product conv's backward)."""
    conv, x, y, w, ei = make(*TINY, n=3, e=5, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, y, w)]
    v = torch.randn(3, conv.irreps_out.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads(a, b, c):
        out = triton_conv(conv.desc, a, b, c, ei)
        return torch.autograd.grad((out * v).sum() + (out ** 2).sum(), (a, b, c), create_graph=True)
    assert torch.autograd.gradgradcheck(grads, args, fast_mode=True)


def test_path_mask_skips_paths():
    conv, x, y, w, ei = make(*BIG, n=4, e=6, dtype=torch.float64)
    mask = torch.tensor([t % 3 != 1 for t in range(len(conv.desc.paths))])
    assert len(build_form(conv.desc, x, mask.tolist()).paths) == int(mask.sum())
    # reference: the torch layer with the masked paths' weights set to zero
    keep = torch.ones(conv.weight_numel, dtype=torch.float64, device=DEVICE)
    for t, p in enumerate(conv.desc.paths):
        if not mask[t]:
            keep[p.weight_offset:p.weight_offset + p.mul_in] = 0
    wr = w.clone().requires_grad_()
    ours = triton_conv(conv.desc, x, y, wr, ei, path_mask=mask)
    assert rel_err(ours, conv(x, y, w * keep, ei)) <= 1e-12
    (gw,) = torch.autograd.grad(ours.sum(), wr)
    assert bool((gw[:, keep == 0] == 0).all()) and bool((gw[:, keep == 1] != 0).any())
    none = triton_conv(conv.desc, x, y, w, ei, path_mask=[False] * len(conv.desc.paths))
    assert none.shape == (4, conv.irreps_out.dim) and not none.any()


def test_zero_edges_and_noncontiguous():
    conv, x, y, w, ei = make(*TINY, n=3, e=5, dtype=torch.float64)
    args = [t[:0].clone().requires_grad_() for t in (y, w)]
    out = triton_conv(conv.desc, x.clone().requires_grad_(), *args, ei[:, :0])
    assert out.shape == (3, conv.irreps_out.dim) and not out.any()
    out.sum().backward()
    # non-contiguous: column-major copies, every other row, and an expanded weight
    xt = x.t().contiguous().t()
    y2 = torch.cat([y, y], 0)[::2]
    w2 = w[:1].expand(5, -1)
    ei2 = torch.stack([ei[1], ei[0]], 1).t()
    assert not (xt.is_contiguous() or y2.is_contiguous() or w2.is_contiguous() or ei2.is_contiguous())
    ours = force_like(lambda a, b, c: triton_conv(conv.desc, a, b, c, ei2), xt, y2, w2)
    ref = force_like(lambda a, b, c: conv(a, b, c, ei2), xt, y2, w2)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(ours, ref))


def test_shared_outputs_and_many_edges_per_receiver():
    """Paths summed into one output irrep (one program each), node 0 with more edges
    than a tile's slots, node 2 with none: exact, and bit-identical when rerun (no
    atomics: the sums are in a fixed order)."""
    irreps1, irreps2 = o3.Irreps("2x0e+2x1o"), o3.Irreps("0e+1o")
    out = o3.Irreps("2x0e+2x1o")
    ins = [(i1, i2, io, "uvu", True) for i1, (_, a) in enumerate(irreps1) for i2, (_, b) in enumerate(irreps2)
           for io, (_, c) in enumerate(out) if c in a * b]
    tp = o3.TensorProduct(irreps1, irreps2, out, ins, shared_weights=False, internal_weights=False).double()
    conv = ChannelwiseConv.from_e3nn(tp).to(DEVICE)
    assert len(conv.desc.paths) > len({p.i_out for p in conv.desc.paths})
    n, e = 3, 3 * triton_conv_module._SLOTS
    g = torch.Generator().manual_seed(1)
    receivers = torch.cat([torch.zeros(2 * triton_conv_module._SLOTS + 3, dtype=torch.long),
                           torch.ones(e - 2 * triton_conv_module._SLOTS - 3, dtype=torch.long)])
    ei = torch.stack([torch.randint(0, n, (e,), generator=g), receivers[torch.randperm(e, generator=g)]]).to(DEVICE)
    x, y, w = (torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE)
               for s in ((n, conv.irreps_in1.dim), (e, conv.irreps_in2.dim), (e, conv.weight_numel)))
    ours = force_like(lambda a, b, c: triton_conv(conv.desc, a, b, c, ei), x, y, w)
    ref = force_like(lambda a, b, c: conv(a, b, c, ei), x, y, w)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(ours, ref))
    assert not ours[0][2].any() and ours[0][0].abs().sum() > 0
    again = force_like(lambda a, b, c: triton_conv(conv.desc, a, b, c, ei), x, y, w)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))


def test_equivariant_under_rotation_and_inversion():
    """conv(D1 x, D2 y) = D_out conv(x, y) for a random rotation composed with inversion,
    with receivers of more edges than a tile's slots."""
    conv, x, y, w, _ = make(*BIG, n=3, e=20, dtype=torch.float64)
    conv = ChannelwiseConv.from_e3nn(uvu_tp(*BIG, built_in=torch.float64)).to(DEVICE)  # exact coefficients
    ei = torch.tensor([[0, 1, 2, 0, 1] * 4, [0] * 12 + [1] * 8], device=x.device)
    rot = random_o3(seed=5)
    d1, d2, d_out = (irreps.D_from_matrix(rot).to(DEVICE) for irreps in (conv.irreps_in1, conv.irreps_in2, conv.irreps_out))
    turned = triton_conv(conv.desc, x @ d1.T, y @ d2.T, w, ei)
    assert rel_err(turned, triton_conv(conv.desc, x, y, w, ei) @ d_out.T) <= 1e-12


def test_orderings_built_once_per_graph(monkeypatch):
    """Every conv of a graph and its derivatives share the receiver and sender orderings;
    an edge_index changed in place gets new ones."""
    conv, x, y, w, ei = make(*TINY, n=3, e=5, dtype=torch.float64)
    built = []
    original = triton_conv_module.Segments.build
    monkeypatch.setattr(triton_conv_module.Segments, "build",
                        lambda ends, others, n: built.append(n) or original(ends, others, n))
    for _ in range(2):  # two layers on one graph
        args = [t.clone().requires_grad_() for t in (x, y, w)]
        torch.autograd.grad(triton_conv(conv.desc, *args, ei).square().sum(), args)
    assert len(built) == 2  # by receiver (forward), by sender (gradient wrt x)
    ei[0] = ei[0].flip(0)  # same tensor, new senders
    assert rel_err(triton_conv(conv.desc, x, y, w, ei), conv(x, y, w, ei)) <= 1e-12
    assert len(built) == 3


def test_no_orderings_kept_across_a_graph_capture(monkeypatch):
    """While a CUDA graph is captured (pretended here), the orderings are built inside it
    (each replay on new edges copied into the same tensor must sort those), none from
    before is reused and none built is kept; frozen-weight derivations from before are
    reused, new ones not kept (they would live in the graph's memory)."""
    from sparsekern.ops import tensor_cache

    conv, x, y, w, ei = make(*TINY, n=3, e=5, dtype=torch.float64)
    built = []
    original = triton_conv_module.Segments.build
    monkeypatch.setattr(triton_conv_module.Segments, "build",
                        lambda ends, others, n: built.append(n) or original(ends, others, n))
    triton_conv(conv.desc, x, y, w, ei)  # eager: built and kept
    monkeypatch.setattr(tensor_cache, "capturing", lambda: True)
    for _ in range(2):
        assert rel_err(triton_conv(conv.desc, x, y, w, ei), conv(x, y, w, ei)) <= 1e-12
    assert len(built) == 3
    weight, made = torch.randn(4), []
    monkeypatch.setattr(tensor_cache, "capturing", lambda: False)
    before = tensor_cache.derived([weight], "k", lambda: made.append(1) or weight * 2)
    monkeypatch.setattr(tensor_cache, "capturing", lambda: True)
    with tensor_cache.held() as held:
        assert tensor_cache.derived([weight], "k", lambda: made.append(1) or weight * 3) is before
        tensor_cache.derived([weight], "other", lambda: made.append(1) or weight * 3)
        tensor_cache.derived([weight], "other", lambda: made.append(1) or weight * 3)
    assert len(made) == 3  # the one before, then "other" twice: not kept
    assert len(held) == 1 and held[0] is before  # the graph keeps what it reads of the cache


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_replays_on_new_edges():
    """A captured conv replayed after new edges are copied into its edge_index (as an MD
    driver would) gives the conv of the new edges, forward and gradients."""
    from sparsekern.integrations.cuda_graphs import capture

    conv, x, y, w, ei = make("8x0e+8x1o", "0e+1o+2e", 2, n=40, e=400, dtype=torch.float32)
    args = [t.clone().requires_grad_() for t in (x, y, w)]

    def run():
        out = triton_conv(conv.desc, *args, ei)
        return (out, *torch.autograd.grad(out.square().sum(), args))

    run()  # eager: compiles, and keeps the orderings of these edges
    graph, outs = capture(run)
    new = torch.stack([ei[0], ei[1].roll(7)])
    ei.copy_(new)
    graph.replay()
    ref = conv(*args, new)
    ref = (ref, *torch.autograd.grad(ref.square().sum(), args))
    assert all(rel_err(a, b) <= 1e-4 for a, b in zip(outs, ref))


def test_channelwise_tp_messages():
    ref = ChannelwiseTP.from_e3nn(uvu_tp(*BIG[:2], 2)).to(DEVICE)
    _, x, y, w, _ = make(*BIG, n=6, e=6, dtype=torch.float64)
    x = x[:, :ref.irreps_in1.dim]
    w = w[:, :ref.weight_numel]
    ours = force_like(lambda a, b, c: triton_tp(ref.desc, a, b, c), x, y, w)
    expected = force_like(ref, x, y, w)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(ours, expected))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mace_sized():
    conv, x, y, w, ei = make("32x0e+32x1o", "0e+1o+2e+3o", 3, n=200, e=3000, dtype=torch.float32)
    ours = force_like(lambda a, b, c: triton_conv(conv.desc, a, b, c, ei), x, y, w)
    ref = force_like(lambda a, b, c: conv(a, b, c, ei), x, y, w)
    assert all(rel_err(a, b) <= 1e-4 for a, b in zip(ours, ref))


def test_inference_mode_edges():
    """An edge_index made under inference mode has no version counter: its orderings are
    built per call, with the same result."""
    conv, x, y, w, ei = make(*TINY, n=3, e=5, dtype=torch.float64)
    with torch.inference_mode():
        fresh = ei.clone()
        assert rel_err(triton_conv(conv.desc, x, y, w, fresh), conv(x, y, w, ei)) <= 1e-12
