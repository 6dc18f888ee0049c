"""Triton element-indexed linear with a block-sparse delta against the torch layer
(ElementLinear, the delta materialised densely for the reference): outputs, gradients
(x, W0, active blocks), second derivatives, zero rows, non-contiguous inputs.
Runs on CPU under TRITON_INTERPRET=1 (tiny shapes)."""

import pytest
import torch

from helpers import TOL, rel_err, triton_device

DEVICE = triton_device()  # before the kernels are imported

from e3nn import o3  # noqa: E402

import sparsekern  # noqa: E402,F401
from sparsekern.layers import ElementLinear  # noqa: E402
from sparsekern.ops.triton.element_linear import element_matmul, path_linears  # noqa: E402


def random_delta(n_el, mul_in, mul_out, T, dtype, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n_el, -(-mul_in // T), -(-mul_out // T))
    active = (torch.rand(shape, generator=g) < density).nonzero()
    slot = torch.full(shape, -1, dtype=torch.int32)
    slot[tuple(active.t())] = torch.arange(len(active), dtype=torch.int32)
    vals = torch.randn(len(active), T, T, generator=g, dtype=dtype)
    return slot.to(DEVICE), vals.to(DEVICE)


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


def torch_reference(layer, x, species, vals_list, slots):
    """The torch layer with W = W0 + dense(dW), path by path in e3nn's flat layout."""
    pieces, n_el = [], layer.num_elements
    for p, w0, slot, vals in zip(layer.desc.paths, layer.desc.path_weights(layer.weight), slots, vals_list):
        w = w0 + dense_delta(slot, vals, p.mul_in, p.mul_out)
        pieces.append(w.transpose(0, 1).reshape(-1))
    one_hot = torch.nn.functional.one_hot(species, n_el).to(x.dtype)
    # the merged weight as a plain tensor: gradients flow to W0 and the delta values
    return torch.func.functional_call(layer, {"weight": torch.cat(pieces)}, (x, one_hot))


def second_order(fn, inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad((out ** 2).sum() + out.sin().sum(), inputs, create_graph=True)
    loss = sum((gi ** 2).sum() + (gi * gi.detach().cos()).sum() for gi in grads)
    return [out.detach()] + [gi.detach() for gi in grads] + list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("T", [1, 2, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_with_delta_matches_torch(T, dtype):
    irreps_in, irreps_out, n_el = o3.Irreps("5x0e+3x1o"), o3.Irreps("18x0e+2x1o"), 3
    layer = make_layer(irreps_in, n_el, irreps_out, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, irreps_in.dim, generator=g, dtype=dtype).to(DEVICE)
    species = torch.tensor([2, 0, 2, 2, 1, 0, 2, 0, 2], device=DEVICE)
    deltas = [random_delta(n_el, p.mul_in, p.mul_out, T, dtype, seed=i) for i, p in enumerate(layer.desc.paths)]
    slots = [s for s, _ in deltas]
    inputs = [x.clone().requires_grad_(), layer.weight] + [v.clone().requires_grad_() for _, v in deltas]

    def ours(x_, _w, *vals):
        return path_linears(x_, species, layer.desc, layer.weight, list(zip(slots, vals))).cat(x_)

    def ref(x_, _w, *vals):
        return torch_reference(layer, x_, species, vals, slots)

    got, want = second_order(ours, inputs), second_order(ref, inputs)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == dtype
        assert rel_err(a, b) <= TOL[dtype], k


@pytest.mark.parametrize("T", [2, 16])
def test_gradcheck_gradgradcheck(T):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 3, generator=g, dtype=torch.float64).to(DEVICE)
    w0 = torch.randn(3, 5, 18, generator=g, dtype=torch.float64).to(DEVICE)
    species = torch.tensor([0, 2, 2, 0, 2, 0], device=DEVICE)  # element 1 absent
    slot, vals = random_delta(3, 5, 18, T, torch.float64, density=0.6)
    args = [x.requires_grad_(), w0.requires_grad_(), vals.requires_grad_()]
    fn = lambda a, b, c: element_matmul(a, b, species, 0.3, slot, c)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def test_delta_only_frozen_w0_and_inactive_blocks():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, 1, generator=g, dtype=torch.float64).to(DEVICE)
    w0 = torch.randn(2, 4, 6, generator=g, dtype=torch.float64).to(DEVICE)  # frozen
    species = torch.tensor([1, 1, 0, 1, 0], device=DEVICE)
    slot, vals = random_delta(2, 4, 6, 2, torch.float64, density=0.4, seed=3)
    vals = torch.cat([vals, torch.randn(1, 2, 2, dtype=torch.float64, device=DEVICE)])  # an unused row
    vals.requires_grad_()
    y = element_matmul(x, w0, species, 1.0, slot, vals)
    ref = torch.einsum("num,nuv->nvm", x, (w0 + dense_delta(slot, vals.detach(), 4, 6))[species])
    assert rel_err(y, ref) <= 1e-12
    (gv,) = torch.autograd.grad(y.sum(), vals)
    assert not gv[-1].any()  # no gradient for a block no slot points to
    only = element_matmul(x, None, species, 1.0, slot, vals, mul_out=6)
    assert rel_err(only, torch.einsum("num,nuv->nvm", x, dense_delta(slot, vals.detach(), 4, 6)[species])) <= 1e-12


def test_zero_rows_and_noncontiguous():
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(DEVICE)
    slot, vals = random_delta(2, 3, 5, 2, torch.float64)
    empty = element_matmul(torch.zeros(0, 3, 3, dtype=torch.float64, device=DEVICE).requires_grad_(), w0,
                           torch.zeros(0, dtype=torch.long, device=DEVICE), 1.0, slot, vals)
    assert empty.shape == (0, 5, 3)
    empty.sum().backward()
    x = torch.randn(3, 7, 3, generator=g, dtype=torch.float64).to(DEVICE).transpose(0, 1)  # (7, 3, 3)
    w0t = w0.transpose(1, 2).contiguous().transpose(1, 2)
    species = torch.tensor([1, 0, 1, 1, 0, 0, 1], device=DEVICE)
    assert not (x.is_contiguous() or w0t.is_contiguous())
    args = [x.clone().requires_grad_(), w0t.clone().requires_grad_(), vals.clone().requires_grad_()]
    got = second_order(lambda a, b, c: element_matmul(a, b, species, 0.5, slot, c), args)
    want = second_order(lambda a, b, c: 0.5 * torch.einsum("num,nuv->nvm", a, (b + dense_delta(slot, c, 3, 5))[species]),
                        args)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mace_sized():
    x = torch.randn(3000, 128, 3, device="cuda")
    w0 = torch.randn(10, 128, 128, device="cuda")
    species = torch.randint(0, 10, (3000,), device="cuda")
    slot, vals = random_delta(10, 128, 128, 16, torch.float32, density=0.05)
    y = element_matmul(x, w0, species, 0.1, slot, vals)
    ref = 0.1 * torch.einsum("num,nuv->nvm", x.double(), (w0 + dense_delta(slot, vals, 128, 128)).double()[species])
    assert rel_err(y.double(), ref) <= 1e-5
