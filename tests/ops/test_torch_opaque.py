"""The torch ops whose control flow reads tensor values (element linear, symmetric
contraction, fused conv) run under torch.compile as the opaque custom op
``sparsekern::opaque``: that route equals eager with first and second derivatives
(gradcheck, gradgradcheck; float64), and compiled layers equal eager, gradients and a
force-style double backward included, on inputs with other species counts and
in-degrees than the ones compiled for."""

import contextlib

import pytest
import torch
from e3nn import get_optimization_defaults, set_optimization_defaults

import sparsekern  # noqa: F401  (imports e3nn safely)
from sparsekern.layers import ChannelwiseConv, ElementLinear
from sparsekern.ops.torch import opaque
from helpers import TOL, one_hot, rel_err


@contextlib.contextmanager
def _no_e3nn_codegen():
    """Layers keep the e3nn module they replace, whose TorchScript code Dynamo refuses."""
    previous = get_optimization_defaults()["jit_script_fx"]
    set_optimization_defaults(jit_script_fx=False)
    try:
        yield
    finally:
        set_optimization_defaults(jit_script_fx=previous)


def _element_linear():
    layer = ElementLinear("2x0e+2x1o", 3, "2x0e+1x1o").double()

    def fn(x, w, attrs):
        return torch.func.functional_call(layer, {"weight": w}, (x, attrs))

    def inputs(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, layer.irreps_in.dim, dtype=torch.float64, generator=g)
        return [x, layer.weight.detach().clone()], [one_hot(n, 3, seed=seed)]

    return fn, inputs


def _conv():
    conv = ChannelwiseConv("2x0e+2x1o", "0e+1o", "2x0e+2x1o+2x1o+2x0e",
                           [(0, 0, 0, "uvu", True), (0, 1, 1, "uvu", True), (1, 0, 2, "uvu", True),
                            (1, 1, 3, "uvu", True)]).double()

    def inputs(n, seed):  # edges: 2n random ones, so in-degrees vary with the seed
        g = torch.Generator().manual_seed(seed)
        e = 2 * n
        args = [torch.randn(rows, dim, dtype=torch.float64, generator=g)
                for rows, dim in ((n, 8), (e, 4), (e, conv.weight_numel))]
        return args, [torch.randint(0, n, (2, e), generator=g)]

    return conv, inputs


def _contraction():
    pytest.importorskip("mace")
    from e3nn import o3
    from mace.modules.symmetric_contraction import SymmetricContraction as MaceSC
    from sparsekern.layers import SymmetricContraction

    torch.manual_seed(0)
    layer = SymmetricContraction.from_e3nn(MaceSC(o3.Irreps("2x0e+2x1o"), o3.Irreps("2x0e+2x1o"),
                                                  correlation=3, num_elements=3)).double()
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *rest):
        *ps, attrs = rest
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x, attrs))

    def inputs(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 2, 4, dtype=torch.float64, generator=g)
        return [x, *(p.detach().clone() for p in layer.parameters())], [one_hot(n, 3, seed=seed)]

    return fn, inputs


CASES = {"element_linear": _element_linear, "conv": _conv, "symmetric_contraction": _contraction}


def _case(name):
    with _no_e3nn_codegen():
        return CASES[name]()


def _differentiable(args):
    return [a.requires_grad_() for a in args]


@pytest.mark.parametrize("name", CASES)
def test_opaque_route_matches_eager_with_derivatives(name, monkeypatch):
    fn, inputs = _case(name)
    args, consts = inputs(3, 0)
    expected = fn(*args, *consts)
    monkeypatch.setattr(opaque, "is_compiling", lambda: True)  # the route torch.compile takes
    args = _differentiable(args)
    got = fn(*args, *consts)
    assert "sparsekern_opaque" in type(got.grad_fn).__name__
    assert rel_err(got, expected) <= TOL[torch.float64]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, *consts), tuple(args), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(lambda *a: fn(*a, *consts), tuple(args), eps=1e-6, atol=1e-7)


def _grads(fn, args, consts, order):
    """Output, its gradients, and for order 2 the gradient of a force-style loss (the
    squared gradient of the output's sum with respect to the first input)."""
    args = _differentiable([a.detach().clone() for a in args])
    y = fn(*args, *consts)
    grads = torch.autograd.grad((y ** 2).sum(), args, create_graph=order == 2)
    if order == 2:
        grads = torch.autograd.grad((grads[0] ** 2).sum(), args)
    return [y.detach(), *grads]


@pytest.mark.parametrize("backend,order", [("aot_eager", 1), ("eager", 2)])
@pytest.mark.parametrize("name", CASES)
def test_compiled_layers_match_eager(name, backend, order):
    """One graph (fullgraph), reused or recompiled for a second input with other
    species counts or in-degrees and more rows. AOTAutograd compiles the backward (it
    has no double backward); Dynamo alone runs the second order."""
    fn, inputs = _case(name)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for n, seed in ((5, 0), (9, 1)):
        args, consts = inputs(n, seed)
        for got, expected in zip(_grads(compiled, args, consts, order), _grads(fn, args, consts, order)):
            assert rel_err(got, expected) <= TOL[torch.float64]
