"""Triton symmetric contraction (MACE's product basis) against the torch back end of
the same layer: outputs, first and second derivatives wrt x, the weights and an attached
sparse delta, gradcheck / gradgradcheck, both use_reduced_cg parametrisations, l <= 3,
correlations 1-3, equivariance, zero nodes, one node, an element over several node
tiles, non-contiguous x, an element with no nodes.
Runs on CPU under TRITON_INTERPRET=1 (tiny shapes)."""

import pytest
import torch

from helpers import TOL, random_o3, rel_err, triton_device

DEVICE = triton_device()  # before the kernels are imported
pytest.importorskip("mace")

from e3nn import o3  # noqa: E402
from mace.modules.symmetric_contraction import SymmetricContraction as MaceSC  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern import delta_slot  # noqa: E402
from sparsekern.finetune import SparseConfig  # noqa: E402
from sparsekern.ops.triton.symmetric_contraction import SpeciesOrder, apply_form, contraction_form  # noqa: E402
from sparsekern.layers import SymmetricContraction  # noqa: E402


SPECIES = [2, 0, 2, 2, 0]  # element 1 of 3 has no nodes


def make_layer(irreps_in, irreps_out, correlation, dtype, reduced=False, delta=False, seed=0):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        ref = MaceSC(o3.Irreps(irreps_in), o3.Irreps(irreps_out), correlation=correlation, num_elements=3,
                     use_reduced_cg=reduced)
    finally:
        torch.set_default_dtype(previous)
    if not delta:
        return SymmetricContraction.from_e3nn(ref).to(DEVICE)
    holder = torch.nn.ModuleDict({"sc": ref})
    sparsekern.prepare(holder, SparseConfig(density=0.5, seed=seed))
    layer = holder["sc"]
    assert isinstance(layer, SymmetricContraction) and delta_slot.has_deltas(layer)
    return layer.to(DEVICE)


def node_inputs(layer, dtype, species=SPECIES, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(species), layer.num_features, layer.desc.coupling_dim, generator=g, dtype=dtype).to(DEVICE)
    attrs = torch.nn.functional.one_hot(torch.tensor(species, dtype=torch.long), layer.num_elements).to(dtype).to(DEVICE)
    return x, attrs


def trainable(layer):
    return [p for p in layer.parameters() if p.requires_grad]


def second_order(layer, backend, x, attrs):
    """Output, gradients of a nonlinear loss wrt (x, trainable parameters), and the
    gradients of a loss on those gradients (what force training differentiates)."""
    layer.set_backend(backend)
    inputs = [x.detach().clone().requires_grad_()] + trainable(layer)
    out = layer(inputs[0], attrs)
    grads = torch.autograd.grad((out ** 2).sum() + out.sin().sum(), inputs, create_graph=True)
    loss = sum((gi ** 2).sum() + (gi * gi.detach().cos()).sum() for gi in grads)
    return [out.detach()] + [gi.detach() for gi in grads] + list(torch.autograd.grad(loss, inputs))


CASES = [  # irreps_in, irreps_out, correlation, use_reduced_cg, delta
    ("2x0e+2x1o", "2x0e+2x1o", 3, False, False),
    ("2x0e+2x1o", "2x0e+2x1o", 3, True, True),
    ("2x0e+2x1o+2x2e", "2x0e+2x2e", 2, True, True),
    ("3x0e+3x1o", "3x0e", 1, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("irreps_in,irreps_out,correlation,reduced,delta", CASES)
def test_matches_torch_to_second_order(irreps_in, irreps_out, correlation, reduced, delta, dtype):
    matches_torch_to_second_order("triton", make_layer(irreps_in, irreps_out, correlation, dtype, reduced, delta), dtype)


def matches_torch_to_second_order(backend: str, layer, dtype) -> None:
    """Output, first and second derivatives of ``layer`` on ``backend`` against torch."""
    x, attrs = node_inputs(layer, dtype)
    want = second_order(layer, "torch", x, attrs)
    got = second_order(layer, backend, x, attrs)
    assert len(got) == len(want) == 3 + 2 * len(trainable(layer))
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == dtype
        assert rel_err(a, b) <= TOL[dtype], k


@pytest.fixture(scope="module")
def layer_l3():
    """l = 3 in and out, correlation 3 (MACE's U tensors for l <= 3 take seconds to build)."""
    return make_layer("1x0e+1x3o", "1x0e+1x3o", 3, torch.float64)


def test_l3_correlation3_first_order(layer_l3):
    x, attrs = node_inputs(layer_l3, torch.float64, species=[0, 2, 2])
    results = {}
    for backend in ("torch", "triton"):
        layer_l3.set_backend(backend)
        xg = x.clone().requires_grad_()
        out = layer_l3(xg, attrs)
        results[backend] = [out.detach()] + list(torch.autograd.grad((out ** 2).sum(), [xg] + trainable(layer_l3)))
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(results["triton"], results["torch"]))


def test_gradcheck_gradgradcheck_with_delta():
    gradcheck_with_delta("triton")


def gradcheck_with_delta(backend: str) -> None:
    """gradcheck and gradgradcheck of a contraction on ``backend`` (float64) wrt x, one
    delta's values and one (frozen by prepare) base weight."""
    layer = make_layer("1x0e+1x1o", "1x0e+1x1o", 3, torch.float64, delta=True).set_backend(backend)
    x, attrs = node_inputs(layer, torch.float64, species=[2, 0])
    names = ["deltas.contractions__1__weights_max.v", "contractions.0.weights_max"]
    params = [layer.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def fn(x_, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x_, attrs))

    args = [x.requires_grad_()] + params
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def test_equivariance_l3(layer_l3):
    layer_l3.set_backend("triton")
    x, attrs = node_inputs(layer_l3, torch.float64, species=[1, 0])
    rot = random_o3(seed=3).to(DEVICE)
    d_in = o3.Irreps("0e+3o").D_from_matrix(rot)  # acts on the coupling index of each channel
    d_out = layer_l3.irreps_out.D_from_matrix(rot)
    assert rel_err(layer_l3(x @ d_in.T, attrs), layer_l3(x, attrs) @ d_out.T) <= 1e-12


def test_zero_nodes_noncontiguous_and_absent_element():
    layer = make_layer("2x0e+2x1o", "2x0e+2x1o", 2, torch.float64).set_backend("triton")
    empty_x, empty_attrs = node_inputs(layer, torch.float64, species=[])
    empty_x.requires_grad_()
    out = layer(empty_x, empty_attrs)
    assert out.shape == (0, layer.irreps_out.dim)
    gx, gw = torch.autograd.grad(out.sum(), [empty_x, layer.contractions[0].weights_max])
    assert gx.shape == empty_x.shape and not gw.any()

    # 20 nodes: 8 of element 0 and 12 of element 2 (a tile of 16 each), none of element 1
    x, attrs = node_inputs(layer, torch.float64, species=SPECIES * 4)
    xt = x.transpose(0, 2).contiguous().transpose(0, 2)  # same values, other strides
    assert not xt.is_contiguous()
    w = layer.contractions[1].weights_max
    got = layer(xt, attrs)
    (gw,) = torch.autograd.grad((got ** 2).sum(), [w])
    assert not gw[1].any() and gw[0].any() and gw[2].any()  # element 1 has no nodes
    layer.set_backend("torch")
    want = layer(x, attrs)
    assert rel_err(got, want) <= 1e-12
    assert rel_err(gw, torch.autograd.grad((want ** 2).sum(), [w])[0]) <= 1e-12


def test_species_of_any_stride():
    """The op's species operand as a column of a wider tensor (stride 2), as torch's takes it."""
    from sparsekern.ops.torch.symmetric_contraction import symmetric_contraction as by_torch
    from sparsekern.ops.triton.symmetric_contraction import symmetric_contraction as by_triton

    layer = make_layer("2x0e+2x1o", "2x0e", 2, torch.float64)
    weights = [[layer._weight(n) for n in names] for names in layer._names()]
    deltas = [[None] * len(w) for w in weights]
    x, _ = node_inputs(layer, torch.float64)
    species = torch.stack([torch.tensor(SPECIES), torch.tensor(SPECIES[::-1])], 1).to(DEVICE)[:, 0]
    assert species.stride() == (2,)
    want = by_torch(layer.desc, x, species, weights, deltas)
    assert rel_err(by_triton(layer.desc, x, species, weights, deltas), want) <= 1e-12


@pytest.mark.parametrize("species", [[1], [0] * 37 + [2]], ids=["one node", "element over 3 node tiles"])
def test_per_element_sums_to_second_order(species):
    """The weight gradient sums each element's nodes in one program: one node, and an
    element with more nodes than a tile (16) holds, its last tile partly past its end."""
    layer = make_layer("2x0e+2x1o", "2x0e+2x1o", 2, torch.float64, delta=True)
    x, attrs = node_inputs(layer, torch.float64, species=species)
    want = second_order(layer, "torch", x, attrs)
    got = second_order(layer, "triton", x, attrs)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(got, want))


def test_refuses_bad_operands_and_correlation_4():
    layer = make_layer("1x0e+1x1o", "1x0e", 2, torch.float64)
    form, _ = contraction_form(layer.desc)
    plan = SpeciesOrder.build(torch.tensor([0, 1], device=DEVICE), 3)
    w = torch.zeros(3, form.dims[0], 1, dtype=torch.float64, device=DEVICE)
    x = torch.zeros(2, 4, 1, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="operand 1 must have shape"):
        apply_form(form, plan, w, x[:, :3], x[:, :3])
    with pytest.raises(ValueError, match="must be one tensor"):
        apply_form(form, plan, w, x, x.clone())
    deep = make_layer("1x0e+1x1o", "1x0e", 4, torch.float64).set_backend("triton")
    with pytest.raises(ValueError, match="correlation <= 3"):
        deep(*node_inputs(deep, torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mp0_medium_shape():
    layer = make_layer("128x0e+128x1o+128x2e+128x3o", "128x0e+128x1o", 3, torch.float32)
    species = torch.randint(0, 3, (2000,)).tolist()
    x, attrs = node_inputs(layer, torch.float32, species=species)
    got = layer.set_backend("triton")(x, attrs)
    layer64 = layer.double().set_backend("torch")
    assert rel_err(got.double(), layer64(x.double(), attrs.double())) <= 1e-5
