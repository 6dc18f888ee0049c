"""cuEquivariance back end (ops/cueq) against the torch back end: the fused conv and the
channelwise TP (outputs, first and second derivatives, gradcheck / gradgradcheck, zero
edges and nodes without edges), MACE's symmetric contraction with and without a delta,
a whole patched MACE model, and the polynomials the GPU kernel ``uniform_1d`` is given.
On CPU this runs cuequivariance_torch's pure-torch method ("naive"); skipped where
cuequivariance_torch is not installed."""

import pytest
import torch

pytest.importorskip("cuequivariance_torch")

from helpers import TOL, rel_err  # noqa: E402
from test_triton_conv import BIG, TINY, force_like, gradcheck_conv, make, uvu_tp  # noqa: E402
from test_triton_symmetric_contraction import (CASES, gradcheck_with_delta, make_layer,  # noqa: E402
                                               matches_torch_to_second_order, node_inputs)

import sparsekern  # noqa: E402
from sparsekern.layers import ChannelwiseTP  # noqa: E402
from sparsekern.ops import registry  # noqa: E402
from sparsekern.ops.cueq import conv as cueq_conv_module, symmetric_contraction as cueq_sc_module  # noqa: E402
from sparsekern.ops.cueq.conv import channelwise_tp as cueq_tp, conv as cueq_conv  # noqa: E402

NAMES = ["out", "dx", "dy", "dw", "ddx", "ddy", "ddw"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_forward_backward_double_backward_match_torch(dtype):
    conv, x, y, w, ei = make(*BIG, n=4, e=9, dtype=dtype)
    ours = force_like(lambda a, b, c: cueq_conv(conv.desc, a, b, c, ei), x, y, w)
    ref = force_like(lambda a, b, c: conv(a, b, c, ei), x, y, w)
    for name, a, b in zip(NAMES, ours, ref):
        assert a.dtype == dtype and a.shape == b.shape
        assert rel_err(a, b) <= TOL[dtype], name


def test_channelwise_tp_through_the_registry():
    _, x, y, w, _ = make(*BIG, n=6, e=6, dtype=torch.float64)
    tp = ChannelwiseTP.from_e3nn(uvu_tp(*BIG[:2], 2)).to(x.device)
    x, w = x[:, :tp.irreps_in1.dim], w[:, :tp.weight_numel]
    ref = force_like(tp, x, y, w)
    assert registry.resolve("cueq", "channelwise_tp", x.device) == "cueq"
    ours = force_like(tp.set_backend("cueq"), x, y, w)
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(ours, ref))
    assert rel_err(cueq_tp(tp.desc, x, y, w), ref[0]) <= 1e-12


def test_conv_gradcheck_gradgradcheck():
    gradcheck_conv(cueq_conv)


def test_conv_zero_edges_and_lonely_nodes():
    conv, x, y, w, ei = make(*TINY, n=4, e=5, dtype=torch.float64)
    args = [t[:0].clone().requires_grad_() for t in (y, w)]
    out = cueq_conv(conv.desc, x.clone().requires_grad_(), *args, ei[:, :0])
    assert out.shape == (4, conv.irreps_out.dim) and not out.any()
    out.sum().backward()
    ei = torch.tensor([[0, 1, 1, 2, 0], [1, 1, 2, 2, 1]], device=x.device)  # nodes 0 and 3 receive nothing
    got = cueq_conv(conv.desc, x, y, w, ei)
    assert not got[0].any() and not got[3].any()
    assert rel_err(got, conv(x, y, w, ei)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("irreps_in,irreps_out,correlation,reduced,delta", CASES)
def test_contraction_matches_torch_to_second_order(irreps_in, irreps_out, correlation, reduced, delta, dtype):
    matches_torch_to_second_order("cueq", make_layer(irreps_in, irreps_out, correlation, dtype, reduced, delta), dtype)


def test_contraction_gradcheck_gradgradcheck_with_delta():
    gradcheck_with_delta("cueq")


def _uniform_1d_ready(poly) -> bool:
    """What cuequivariance_torch's uniform_1d checks before it launches (CPU proxy)."""
    poly = poly.flatten_coefficient_modes().squeeze_modes()
    if not all(o.ndim in (0, 1) and o.all_same_segment_shape() for o in poly.operands):
        return False
    extents = {o.segment_shape for o in poly.operands if o.ndim == 1 and o.segments}
    return len(extents) == 1 and all(stp.coefficient_subscripts == "" for _, stp in poly.operations)


def test_uniform_channels_make_uniform_1d_polynomials():
    """MACE's layers (one multiplicity) give polynomials the CUDA kernel accepts."""
    conv, *_ = make("3x0e+3x1o+3x2e", "0e+1o+2e", 2, n=1, e=1, dtype=torch.float64)
    assert _uniform_1d_ready(cueq_conv_module._polynomial(conv.desc))
    layer = make_layer("2x0e+2x1o", "2x0e+2x1o", 3, torch.float64)
    assert _uniform_1d_ready(cueq_sc_module._polynomial(layer.desc))
    mixed, *_ = make(*TINY, n=1, e=1, dtype=torch.float64)
    assert _uniform_1d_ready(cueq_conv_module._polynomial(mixed.desc))  # 2x everywhere
    mixed, *_ = make(*BIG, n=1, e=1, dtype=torch.float64)
    assert not _uniform_1d_ready(cueq_conv_module._polynomial(mixed.desc))  # 3x, 2x, 1x: naive



def _energy_forces_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(batch, training=True, compute_force=True)
    grads = torch.autograd.grad((out["forces"] ** 2).sum() + out["energy"].sum(), params, allow_unused=True)
    return [out["energy"].detach(), out["forces"].detach()] + [g for g in grads if g is not None]


def test_whole_mace_model_on_cueq():
    """MACE-MP-0 small's layout (float64): energies, forces and force-loss gradients of
    the model patched with backend="cueq" (its convs and contractions) = unpatched."""
    from ase.build import bulk
    from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped

    model = mace_mp0_shaped("small", seed=1, num_elements=3)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=2)
    atoms.numbers = [1, 2, 3, 1, 2, 3, 1, 2]
    batch = mace_batch(model, [atoms])
    for p in model.parameters():
        p.requires_grad_(True)
    ref = _energy_forces_grads(model, batch)
    sparsekern.patch(model, backend="cueq")
    ran = {registry.resolve(m.backend, m.op, torch.device("cpu")) for _, m in sparsekern.patched_layers(model)
           if m.op in ("conv", "symmetric_contraction")}
    assert ran == {"cueq"}
    got = _energy_forces_grads(model, batch)
    assert len(got) == len(ref) and all(rel_err(a, b) <= 1e-12 for a, b in zip(got, ref))


def test_contraction_zero_nodes_and_absent_element():
    layer = make_layer("2x0e+2x1o", "2x0e+2x1o", 2, torch.float64).set_backend("cueq")
    x, attrs = node_inputs(layer, torch.float64, species=[])
    out = layer(x.requires_grad_(), attrs)
    assert out.shape == (0, layer.irreps_out.dim)
    (gw,) = torch.autograd.grad(out.sum(), [layer.contractions[0].weights_max])
    assert not gw.any()
    x, attrs = node_inputs(layer, torch.float64, species=[0, 2, 2])  # element 1 absent
    w = layer.contractions[1].weights_max
    got = layer(x, attrs)
    (gw,) = torch.autograd.grad((got ** 2).sum(), [w])
    assert not gw[1].any() and gw[0].any()
    want = layer.set_backend("torch")(x, attrs)
    assert rel_err(got, want) <= 1e-12
    assert rel_err(gw, torch.autograd.grad((want ** 2).sum(), [w])[0]) <= 1e-12
