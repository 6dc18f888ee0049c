"""Triton irrep linear (the grouped element-linear kernel with one element: one launch
per pass) against the torch back end of IrrepsLinear: outputs, gradients (x, W0, bias,
delta), second derivatives, several paths into one output, empty irreps, biases, zero
rows, non-contiguous input, a delta with inactive 16x16 blocks. Runs on CPU under
TRITON_INTERPRET=1 (tiny shapes)."""

import pytest
import torch

from helpers import TOL, rel_err, triton_device

DEVICE = triton_device()  # before the kernels are imported

from e3nn import o3  # noqa: E402

import sparsekern  # noqa: E402,F401
from sparsekern.finetune.delta import FixedDelta  # noqa: E402
from sparsekern.layers import IrrepsLinear  # noqa: E402
from sparsekern import delta_slot  # noqa: E402
from sparsekern.ops.triton.element_linear import ElementRows, grouped_linear  # noqa: E402
from test_triton_element_linear import combine, dense_delta, random_delta, second_order  # noqa: E402

# 20x0e and 3x0e both feed 18x0e (two paths into one output, 2 x 2 and 1 x 2 tiles of
# 16); 0x1e is empty on both sides; 2x2e has no path in (zeros, or its bias-free zero).
IRREPS_IN, IRREPS_OUT = o3.Irreps("20x0e+3x0e+2x1o+0x1e"), o3.Irreps("18x0e+0x1e+3x1o+2x2e")


def make_layer(dtype, biases=True, seed=0):
    torch.manual_seed(seed)
    layer = IrrepsLinear(IRREPS_IN, IRREPS_OUT, biases=biases).to(DEVICE, dtype)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def attach_delta(layer, seed=0):
    """A FixedDelta (what fast mode and loaded adapters attach) touching 16x16 tiles
    (0, 1) and (1, 0) of the 20x18 path and one entry of the 1o path: tiles (0, 0) and
    (1, 1), and the whole 3x18 path, stay inactive."""
    p0, _, p2 = layer.desc.paths
    entries = [(p0, 3, 17), (p0, 15, 16), (p0, 19, 2), (p0, 16, 0), (p2, 1, 2)]
    index = torch.tensor([p.weight_offset + u * p.mul_out + v for p, u, v in entries])
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(len(entries), generator=g, dtype=layer.weight.dtype).to(DEVICE)
    delta_slot.attach(layer, "weight", FixedDelta(layer.weight_groups(), layer.weight_numel, index.to(DEVICE), values))
    return delta_slot.get(layer, "weight").values


def run(layer, backend, x):
    layer.backend = backend
    return layer(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch_with_delta(dtype):
    layer = make_layer(dtype)
    values = attach_delta(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, IRREPS_IN.dim, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    inputs = [x, layer.weight, layer.bias, values]
    got = second_order(lambda x_, *_: run(layer, "triton", x_), inputs)
    want = second_order(lambda x_, *_: run(layer, "torch", x_), inputs)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == dtype
        assert rel_err(a, b) <= TOL[dtype], k
    assert got[0][:, -IRREPS_OUT[-1].dim:].abs().max() == 0  # 2x2e: no path, no bias


def test_zero_delta_being_trained_gets_its_gradient():
    """A delta that starts at zero (LoRA's B, a fresh fast-mode delta) must get the same
    gradient as on torch: its zero tiles are not skipped while it trains."""
    layer = make_layer(torch.float64)
    values = attach_delta(layer)
    with torch.no_grad():
        values.zero_()
    x = torch.randn(5, IRREPS_IN.dim, dtype=torch.float64).to(DEVICE)
    got, want = (torch.autograd.grad(run(layer, backend, x).square().sum() + run(layer, backend, x).sum(), values)[0]
                 for backend in ("triton", "torch"))
    assert want.abs().min() > 0 and rel_err(got, want) <= 1e-12


def test_frozen_delta_skips_its_zero_tiles():
    """Not trained (an adapter for inference): tiles of zeros are marked inactive and
    skipped, and the output is still exact."""
    layer = make_layer(torch.float64)
    attach_delta(layer).requires_grad_(False)
    with torch.no_grad():
        slot, _ = delta_slot.active_blocks(layer._delta("weight"), layer.desc.weight_groups(), 16)
    assert (slot < 0).any() and (slot >= 0).any()
    x = torch.randn(5, IRREPS_IN.dim, dtype=torch.float64).to(DEVICE)
    assert rel_err(run(layer, "triton", x), run(layer, "torch", x)) <= 1e-12


def test_active_blocks_are_the_tiles():
    """The tiles as a loop over them cuts them (both layouts, ragged edge tiles, a gap
    before, between and after the groups), to second order; inactive ones marked."""
    from sparsekern.paths import WeightGroup

    groups = [WeightGroup("w", 2, (2, 3, 17), "grc", "a", 0, True), WeightGroup("w", 110, (3, 18, 2), "rgc", "b", 1, True)]
    flat = torch.randn(110 + 108 + 4, dtype=torch.float64)
    flat[2:2 + 17] = 0  # element 0's first row: its first tile still has rows 1, 2
    flat[110:] = torch.where(torch.arange(112) % 7 == 0, flat[110:], 0)  # some tiles of "b" all zero
    T = 16
    want = []
    for g in groups:
        view = g.view(flat)
        for e in range(g.shape[0]):
            for i in range(0, g.shape[1], T):
                for j in range(0, g.shape[2], T):
                    tile = torch.zeros(T, T, dtype=flat.dtype)
                    block = view[e, i:i + T, j:j + T]
                    tile[:block.shape[0], :block.shape[1]] = block
                    want.append(tile)
    slot, values = delta_slot.active_blocks(flat, groups, T)
    assert torch.equal(values, torch.stack(want))
    active = torch.stack(want).flatten(1).ne(0).any(1)
    assert not active.all() and torch.equal(slot, torch.where(active, torch.arange(len(want), dtype=torch.int32), -1))
    fn = lambda f: delta_slot.active_blocks(f, groups, T)[1]  # noqa: E731
    flat.requires_grad_()
    assert torch.equal(delta_slot.active_blocks(flat, groups, T)[0], torch.arange(len(want), dtype=torch.int32))
    assert torch.autograd.gradcheck(fn, (flat,)) and torch.autograd.gradgradcheck(fn, (flat,))


def test_gradcheck_gradgradcheck():
    layer = make_layer(torch.float64)
    values = attach_delta(layer)
    layer.backend = "triton"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, IRREPS_IN.dim, generator=g, dtype=torch.float64).to(DEVICE)
    names = ("weight", "bias", "deltas.weight.values")

    def fn(x_, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x_,))

    args = [t.detach().clone().requires_grad_() for t in (x, layer.weight, layer.bias, values)]
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def test_explicit_blocks_inactive_and_unused():
    """grouped_linear with explicit (block_slot, block_values): the delta's gradient
    exists for active blocks only; a values row no slot points to gets none; paths
    whose tiles are all inactive add W0 alone."""
    layer = make_layer(torch.float64, biases=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, IRREPS_IN.dim, generator=g, dtype=torch.float64).to(DEVICE)
    slot0, vals0 = random_delta(1, 20, 18, 16, torch.float64, density=0.5, seed=4)
    assert 0 < (slot0 >= 0).sum() < slot0.numel()
    none = [torch.full((1, -(-p.mul_in // 16), -(-p.mul_out // 16)), -1, dtype=torch.int32, device=DEVICE)
            for p in layer.desc.paths[1:]]
    unused = torch.randn(1, 16, 16, dtype=torch.float64, device=DEVICE)
    slot, vals = combine([slot0] + none, [vals0, unused[:0], unused])
    vals.requires_grad_()
    y = grouped_linear(x, ElementRows.in_order(x.shape[0]), layer.desc, layer.weight, (slot, vals))
    p0, p1, p2 = layer.desc.paths
    w0, w1, w2 = [w[0] for w in layer.desc.path_weights(layer.weight.detach())]
    ref = p0.scale * x[:, :20] @ (w0 + dense_delta(slot0, vals0, 20, 18)[0]) + p1.scale * x[:, 20:23] @ w1
    assert rel_err(y[:, :18], ref) <= 1e-12
    ref2 = p2.scale * torch.einsum("num,uv->nvm", x[:, 23:29].reshape(5, 2, 3), w2).reshape(5, 9)
    assert rel_err(y[:, 18:27], ref2) <= 1e-12
    assert not y[:, 27:].any()  # 2x2e: no path
    (gv,) = torch.autograd.grad(y.sum(), vals)
    assert gv[:-1].abs().amax((1, 2)).min() > 0 and not gv[-1].any()


def test_zero_rows_lead_dims_noncontiguous_no_bias():
    layer = make_layer(torch.float64, biases=False)
    attach_delta(layer)
    empty = torch.zeros(0, IRREPS_IN.dim, dtype=torch.float64, device=DEVICE).requires_grad_()
    y = run(layer, "triton", empty)
    assert y.shape == (0, IRREPS_OUT.dim)
    y.sum().backward()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(IRREPS_IN.dim, 2, 3, generator=g, dtype=torch.float64).to(DEVICE).permute(1, 2, 0)
    assert not x.is_contiguous()
    args = [x.clone().requires_grad_(), layer.weight]
    got = second_order(lambda x_, _w: run(layer, "triton", x_), args)
    want = second_order(lambda x_, _w: run(layer, "torch", x_), args)
    assert got[0].shape == (2, 3, IRREPS_OUT.dim)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mp0_sized():
    """MACE-MP-0 medium's post-conv linear (10 paths into 4 outputs) with a 5 % delta,
    float32 on the GPU against the torch back end in float64: output and gradients."""
    import copy

    irreps_in = o3.Irreps("128x0e+128x0e+128x1o+128x1o+128x1o+128x2e+128x2e+128x2e+128x3o+128x3o")
    layer = IrrepsLinear(irreps_in, o3.Irreps("128x0e+128x1o+128x2e+128x3o")).to("cuda")
    g = torch.Generator().manual_seed(0)
    index = torch.randperm(layer.weight_numel, generator=g)[: layer.weight_numel // 20]
    delta_slot.attach(layer, "weight", FixedDelta(layer.weight_groups(), layer.weight_numel, index.cuda(),
                                                  torch.randn(len(index), generator=g).cuda()))
    ref_layer = copy.deepcopy(layer).double()
    x = torch.randn(3000, irreps_in.dim, device="cuda", requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y, ref = run(layer, "triton", x), run(ref_layer, "torch", x64)
    assert rel_err(y.double(), ref) <= 1e-5
    got = torch.autograd.grad(y.square().sum(), [x, delta_slot.get(layer, "weight").values])
    want = torch.autograd.grad(ref.square().sum(), [x64, delta_slot.get(ref_layer, "weight").values])
    assert all(rel_err(a.double(), b) <= 1e-5 for a, b in zip(got, want))



def _x_gradient(y, x):
    return torch.autograd.grad(y.sum(), x)[0] if y.requires_grad else torch.zeros_like(x)


@pytest.mark.parametrize("irreps_in,irreps_out", [("2x0e", "2x0e+40x1o"), ("2x0e+40x1o", "2x0e"), ("3x1o", "2x2e")])
def test_blocks_no_path_reaches_are_zeros(irreps_in, irreps_out):
    """A block wider than every path's (or with no path at all) is zeros in the output and
    in x's gradient: its columns past the paths' widest were left as the allocation found
    them (the grid covered the paths' widths only). NaN-filled buffers of the sizes are
    freed first, so that memory left unwritten shows."""
    torch.manual_seed(0)
    layer = IrrepsLinear(o3.Irreps(irreps_in), o3.Irreps(irreps_out)).to(DEVICE, torch.float64)
    x = torch.randn(5, layer.irreps_in.dim, device=DEVICE, dtype=torch.float64, requires_grad=True)
    layer.backend = "torch"
    want = layer(x)
    want_gx = _x_gradient(want, x)
    layer.backend = "triton"
    for _ in range(3):
        for dim in (layer.irreps_in.dim, layer.irreps_out.dim):
            torch.full((5, dim), float("nan"), device=DEVICE, dtype=torch.float64)
        y = layer(x)
        assert torch.allclose(y, want, rtol=1e-12, atol=1e-15)
        assert torch.allclose(_x_gradient(y, x), want_gx, rtol=1e-12, atol=1e-15)
