"""Gate: e3nn's values (float64 / float32, any leading shape, gated or not, odd scalars,
identity activations), derivatives of every order, equivariance under rotations and
inversion, patch / unpatch, its op count against e3nn's, and what it refuses."""

import pytest
import torch
from e3nn import nn, o3

import sparsekern
from sparsekern.layers import Gate
from helpers import TOL, AtenOps, random_o3, rel_err

silu, tanh, sigmoid = torch.nn.functional.silu, torch.tanh, torch.sigmoid
CASES = {  # e3nn Gate arguments
    "sevennet": ("16x0e", [silu], "8x0e+4x0e", [silu, silu], "8x1e+4x2e"),
    "mixed parities": ("8x0e+4x0o", [silu, tanh], "3x0e+2x0o", [sigmoid, tanh], "2x1o+1x2e+2x1e"),
    "even act on odd scalars": ("4x0o", [torch.abs], "2x0e", [sigmoid], "1x1o+1x3o"),
    "no gates": ("8x0e+3x0e", [None, tanh], "", [], ""),
}


def _pair(case, dtype=torch.float64):
    ref = nn.Gate(*CASES[case]).to(dtype)
    return ref, Gate.from_e3nn(ref)


def _x(ref, *lead, dtype=torch.float64, seed=0):
    return torch.randn(*lead, ref.irreps_in.dim, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_e3nn(case, dtype):
    ref, ours = _pair(case)
    x = _x(ref, 11, 3)
    got = Gate.from_e3nn(nn.Gate(*CASES[case]).to(dtype))(x.to(dtype))
    assert got.dtype == dtype and got.shape == (11, 3, ref.irreps_out.dim)
    assert rel_err(got.double(), ref(x)) <= TOL[dtype]
    assert ours(x[:0]).shape == (0, 3, ref.irreps_out.dim)
    assert ours.irreps_out == ref.irreps_out and ours.irreps_in == ref.irreps_in


@pytest.mark.parametrize("case", ["mixed parities", "no gates"])
def test_grads_of_every_order(case):
    ref, ours = _pair(case)
    x = _x(ref, 5).requires_grad_()
    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradgradcheck(ours, (x,))
    weight = _x(ref, 5, seed=1)[:, :ref.irreps_out.dim]  # force training: a loss of the input gradient

    def second(gate):
        (g,) = torch.autograd.grad((gate(x) * weight).sum(), x, create_graph=True)
        return g, torch.autograd.grad(g.square().sum(), x)[0]

    for got, want in zip(second(ours), second(ref)):
        assert rel_err(got, want) <= 1e-12


def test_silu_third_derivatives():
    """SiLU runs through ``ops/torch/silu.py`` (its backward one op, its double backward
    written out): the first derivative's own first and second derivatives checked."""
    ref, ours = _pair("sevennet")
    x = _x(ref, 4).requires_grad_()
    weight = _x(ref, 4, seed=1)[:, :ref.irreps_out.dim]

    def first(x):
        return torch.autograd.grad((ours(x) * weight).sum(), x, create_graph=True)[0]

    assert torch.autograd.gradcheck(first, (x,)) and torch.autograd.gradgradcheck(first, (x,))

    def third(gate):  # the values of every order, against autograd over e3nn's
        (g,) = torch.autograd.grad((gate(x) * weight).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), x, create_graph=True)
        return torch.autograd.grad((h * weight[:, :1]).sum(), x)[0]

    assert rel_err(third(ours), third(ref)) <= 1e-12


@pytest.mark.parametrize("case", list(CASES))
def test_equivariant(case):
    _, ours = _pair(case)
    R = random_o3(seed=3)
    d_in, d_out = ours.irreps_in.D_from_matrix(R), ours.irreps_out.D_from_matrix(R)
    x = _x(ours, 9)
    assert rel_err(ours(x @ d_in.T), ours(x) @ d_out.T) <= 1e-12


def test_patch_unpatch_and_fewer_ops():
    """In a model, with force training's two derivatives: the gate's forward / +backward /
    +double backward 8 / 21 / 59 aten ops against e3nn's 66-72 / 167-171 / 371 (e3nn 0.4.4
    and 0.6; SevenNet's shape of gate)."""
    ref = nn.Gate(*CASES["sevennet"]).double()
    model = torch.nn.Sequential(o3.Linear("4x0e+2x1e+2x2e", ref.irreps_in), ref).double()
    x = _x(model[0], 7).requires_grad_()

    def ops_of(m):
        with AtenOps() as ops:
            y = m[1](m[0](x))
            counts = [ops.n]
            (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            counts.append(ops.n)
            g.square().sum().backward()
        return counts + [ops.n]

    want, ref_ops = model(x), ops_of(model)
    sparsekern.patch(model, backend="torch")
    assert isinstance(model[1], Gate) and rel_err(model(x), want) <= 1e-12
    ours = ops_of(model)
    linear = ops_of(torch.nn.Sequential(model[0], torch.nn.Identity()))
    gate_ops, e3nn_ops = [o - l for o, l in zip(ours, linear)], [r - l for r, l in zip(ref_ops, linear)]
    print(f"gate aten ops (fwd, +bwd, +dbl): {gate_ops}, e3nn's {e3nn_ops}")  # shown with -s
    assert all(g <= 0.25 * e for g, e in zip(gate_ops, e3nn_ops)), (gate_ops, e3nn_ops)
    assert model.state_dict().keys() == torch.nn.Sequential(model[0], ref).state_dict().keys()
    sparsekern.unpatch(model)
    assert type(model[1]) is nn.Gate and rel_err(model(x), want) <= 1e-12


def test_refuses_wrong_features():
    _, ours = _pair("sevennet")
    with pytest.raises(ValueError, match="last dimension 5, but its irreps 28x0e.* have dimension 72"):
        ours(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating point"):
        ours(torch.zeros(3, ours.irreps_in.dim, dtype=torch.long))
