"""Triton element-indexed linear with a block-sparse delta (one grouped launch over the
paths) against the torch layer (ElementLinear, the delta materialised densely for the
reference): outputs, gradients (x, W0, active blocks), second derivatives, several paths
into one output, an output without paths, one element and several (one absent), zero
rows, non-contiguous inputs. Runs on CPU under TRITON_INTERPRET=1 (tiny shapes)."""

import pytest
import torch

from helpers import TOL, rel_err, triton_device

DEVICE = triton_device()  # before the kernels are imported

from e3nn import o3  # noqa: E402

import sparsekern  # noqa: E402,F401
from sparsekern.layers import ElementLinear  # noqa: E402
from sparsekern.ops.triton.element_linear import ElementRows, grouped_linear  # noqa: E402


def random_delta(n_el, mul_in, mul_out, T, dtype, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n_el, -(-mul_in // T), -(-mul_out // T))
    active = (torch.rand(shape, generator=g) < density).nonzero()
    slot = torch.full(shape, -1, dtype=torch.int32)
    slot[tuple(active.t())] = torch.arange(len(active), dtype=torch.int32)
    vals = torch.randn(len(active), T, T, generator=g, dtype=dtype)
    return slot.to(DEVICE), vals.to(DEVICE)


def combine(slots, vals):
    """Per-path (slot, values) as the kernel reads them: one flat slot table, the
    values stacked (each path's slot rows shifted past the earlier paths' values)."""
    flat, rows = [], 0
    for s, v in zip(slots, vals):
        flat.append(torch.where(s >= 0, s + rows, s).flatten())
        rows += v.shape[0]
    return torch.cat(flat), torch.cat(list(vals))


def dense_delta(slot, vals, mul_in, mul_out):
    """The reference's materialised dW (the kernel never forms it)."""
    n_el, nu, nv = slot.shape
    T = vals.shape[1]
    full = torch.cat([vals.new_zeros(1, T, T), vals])[slot.long() + 1]  # (n_el, nu, nv, T, T)
    return full.permute(0, 1, 3, 2, 4).reshape(n_el, nu * T, nv * T)[:, :mul_in, :mul_out]


def make_layer(irreps_in, n_el, irreps_out, dtype):
    layer = ElementLinear(irreps_in, n_el, irreps_out).to(DEVICE, dtype)
    with torch.no_grad():
        layer.weight.normal_()
    return layer


def torch_reference(layer, weight, x, species, vals_list, slots):
    """The torch layer with W = W0 + dense(dW), path by path in e3nn's flat layout."""
    pieces, n_el = [], layer.num_elements
    for p, w0, slot, vals in zip(layer.desc.paths, layer.desc.path_weights(weight), slots, vals_list):
        w = w0 + dense_delta(slot, vals, p.mul_in, p.mul_out)
        pieces.append(w.transpose(0, 1).reshape(-1))
    one_hot = torch.nn.functional.one_hot(species, n_el).to(x.dtype)
    # the merged weight as a plain tensor: gradients flow to W0 and the delta values
    return torch.func.functional_call(layer, {"weight": torch.cat(pieces)}, (x, one_hot))


def ours(layer, weight, x, species, vals_list, slots):
    plan = ElementRows.build(species, layer.num_elements)
    return grouped_linear(x, plan, layer.desc, weight, combine(slots, vals_list))


def second_order(fn, inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad((out ** 2).sum() + out.sin().sum(), inputs, create_graph=True)
    loss = sum((gi ** 2).sum() + (gi * gi.detach().cos()).sum() for gi in grads)
    return [out.detach()] + [gi.detach() for gi in grads] + list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("n_el", [1, 3])
@pytest.mark.parametrize("T", [1, 2, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_with_delta_matches_torch(n_el, T, dtype):
    """Two paths into 18x0e (the first with no active tile), 2x2e without a path; with
    three elements, element 1 absent."""
    irreps_in, irreps_out = o3.Irreps("5x0e+3x0e+3x1o"), o3.Irreps("18x0e+2x1o+2x2e")
    layer = make_layer(irreps_in, n_el, irreps_out, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, irreps_in.dim, generator=g, dtype=dtype).to(DEVICE)
    species = torch.tensor([2, 0, 2, 2, 0, 0, 2, 0, 2], device=DEVICE) % n_el
    deltas = [random_delta(n_el, p.mul_in, p.mul_out, T, dtype, density=0.7 * (i > 0), seed=i)
              for i, p in enumerate(layer.desc.paths)]
    deltas[0] = deltas[0][0], torch.randn(1, T, T, dtype=dtype, device=DEVICE)  # a row no slot points to
    assert (deltas[0][0] < 0).all() and all((s >= 0).any() for s, _ in deltas[1:])
    slots = [s for s, _ in deltas]
    inputs = [x.clone().requires_grad_(), layer.weight] + [v.clone().requires_grad_() for _, v in deltas]
    got = second_order(lambda x_, w, *vals: ours(layer, w, x_, species, vals, slots), inputs)
    want = second_order(lambda x_, w, *vals: torch_reference(layer, w, x_, species, vals, slots), inputs)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == dtype
        assert rel_err(a, b) <= TOL[dtype], k
    assert got[0][:, -10:].abs().max() == 0  # 2x2e: no path


@pytest.mark.parametrize("T", [2, 16])
def test_gradcheck_gradgradcheck(T):
    """Two paths into one output, three elements (element 1 absent)."""
    layer = make_layer(o3.Irreps("5x1o+2x1o"), 3, o3.Irreps("18x1o"), torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 21, generator=g, dtype=torch.float64).to(DEVICE)
    species = torch.tensor([0, 2, 2, 0, 2, 0], device=DEVICE)
    deltas = [random_delta(3, p.mul_in, 18, T, torch.float64, density=0.6, seed=i)
              for i, p in enumerate(layer.desc.paths)]
    slots = [s for s, _ in deltas]
    args = [x.requires_grad_(), layer.weight.detach().clone().requires_grad_()]
    args += [v.requires_grad_() for _, v in deltas]
    fn = lambda x_, w, *vals: ours(layer, w, x_, species, vals, slots)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def test_delta_only_frozen_w0_and_inactive_blocks():
    layer = make_layer(o3.Irreps("4x0e"), 2, o3.Irreps("6x0e"), torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64).to(DEVICE)
    species = torch.tensor([1, 1, 0, 1, 0], device=DEVICE)
    slot, vals = random_delta(2, 4, 6, 2, torch.float64, density=0.4, seed=3)
    assert 0 < (slot >= 0).sum() < slot.numel()
    vals = torch.cat([vals, torch.randn(1, 2, 2, dtype=torch.float64, device=DEVICE)])  # an unused row
    vals.requires_grad_()
    plan = ElementRows.build(species, 2)
    w0 = layer.weight.detach()  # frozen
    y = grouped_linear(x, plan, layer.desc, w0, (slot.flatten(), vals))
    (p,), (w,) = layer.desc.paths, layer.desc.path_weights(w0)
    dw = dense_delta(slot, vals.detach(), 4, 6)
    assert rel_err(y, p.scale * torch.einsum("nu,nuv->nv", x, (w + dw)[species])) <= 1e-12
    (gv,) = torch.autograd.grad(y.sum(), vals)
    assert not gv[-1].any()  # no gradient for a block no slot points to
    only = grouped_linear(x, plan, layer.desc, None, (slot.flatten(), vals))
    assert rel_err(only, p.scale * torch.einsum("nu,nuv->nv", x, dw[species])) <= 1e-12


def test_zero_rows_and_noncontiguous():
    layer = make_layer(o3.Irreps("3x1o"), 2, o3.Irreps("5x1o"), torch.float64)
    g = torch.Generator().manual_seed(4)
    slot, vals = random_delta(2, 3, 5, 2, torch.float64)
    empty = torch.zeros(0, 9, dtype=torch.float64, device=DEVICE).requires_grad_()
    y = ours(layer, layer.weight, empty, torch.zeros(0, dtype=torch.long, device=DEVICE), [vals], [slot])
    assert y.shape == (0, 15)
    y.sum().backward()
    x = torch.randn(9, 7, generator=g, dtype=torch.float64).to(DEVICE).t()  # (7, 9)
    w = torch.randn(2 * layer.weight_numel, generator=g, dtype=torch.float64).to(DEVICE)[::2]
    species = torch.tensor([1, 0, 1, 1, 0, 0, 1], device=DEVICE)
    assert not (x.is_contiguous() or w.is_contiguous())
    args = [x.clone().requires_grad_(), w.clone().requires_grad_(), vals.clone().requires_grad_()]
    got = second_order(lambda x_, w_, v: ours(layer, w_, x_, species, [v], [slot]), args)
    want = second_order(lambda x_, w_, v: torch_reference(layer, w_, x_, species, [v], [slot]), args)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mace_sized():
    """skip_tp-sized, 10 elements, a 5 % delta: float32 against float64."""
    layer = make_layer(o3.Irreps("128x0e+128x1o"), 10, o3.Irreps("128x0e+128x1o"), torch.float32)
    x = torch.randn(3000, layer.desc.blocks_in.dim, device="cuda")
    species = torch.randint(0, 10, (3000,), device="cuda")
    deltas = [random_delta(10, 128, 128, 16, torch.float32, density=0.05, seed=i) for i in range(2)]
    slots, vals = [s for s, _ in deltas], [v for _, v in deltas]
    y = ours(layer, layer.weight, x, species, vals, slots)
    ref = torch_reference(layer.double(), layer.weight, x.double(), species, [v.double() for v in vals], slots)
    assert rel_err(y.double(), ref) <= 1e-5


def test_species_and_plans_once_per_graph(monkeypatch):
    """The element-indexed layers of one graph share its species (one-hot check and argmax
    once) and its node tiling; node_attrs changed in place is planned anew, and tensors
    made under inference mode (no version counter) are planned per call."""
    import sparsekern.ops.triton.element_linear as module

    built = []
    original = module.ElementRows.build
    monkeypatch.setattr(module.ElementRows, "build", lambda s, n: built.append(n) or original(s, n))
    layers = [make_layer(o3.Irreps("3x0e+2x1o"), 3, o3.Irreps("4x0e+1x1o"), torch.float64).set_backend("triton")
              for _ in range(2)]
    x = torch.randn(7, 9, dtype=torch.float64, device=DEVICE)
    attrs = torch.nn.functional.one_hot(torch.tensor([2, 0, 1, 1, 0, 2, 2]), 3).to(DEVICE, torch.float64)
    want = [layer(x, attrs) for layer in layers]
    assert layers[0]._species(attrs, 3) is layers[1]._species(attrs, 3) and len(built) == 1
    attrs[[0, 1]] = attrs[[1, 0]]  # in place: nodes 0 and 1 swap elements
    swapped = layers[0](x, attrs)
    assert len(built) == 2 and not torch.equal(swapped, want[0])
    with torch.inference_mode():
        fresh = attrs.clone()
        assert all(torch.equal(layer(x, fresh), layer(x, attrs)) for layer in layers)
    assert len(built) == 4  # each call on the inference-mode tensor its own; attrs' plan kept
