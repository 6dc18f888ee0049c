"""PolynomialCutoff: MACE's envelope values (inside, at and past r_max), derivatives of
all orders, MACE's buffers kept (state dicts, a loaded degree), patch and unpatch in a
MACE model, what it refuses, and its op count."""

import pytest
import torch

import sparsekern
from helpers import TOL, AtenOps, rel_err

pytest.importorskip("mace")
from mace.modules.radial import PolynomialCutoff as MaceCutoff  # noqa: E402

from sparsekern.layers import PolynomialCutoff  # noqa: E402


def distances(dtype, r_max):
    """Inside, at and past the cutoff, in any leading shape."""
    x = torch.linspace(0.0, 1.3 * r_max, 61, dtype=torch.float64).reshape(-1, 1)
    return torch.cat([x, torch.tensor([[r_max]], dtype=torch.float64)]).to(dtype)


@pytest.mark.parametrize("p", [5, 6, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_mace(p, dtype):
    ref = MaceCutoff(r_max=4.5, p=p).double()
    ours = PolynomialCutoff.from_e3nn(MaceCutoff(r_max=4.5, p=p).to(dtype))
    x = distances(torch.float64, 4.5)
    want = ref(x)  # float32 against float64: both forms are 1e-6 off (rounding in u's powers)
    got = ours(x.to(dtype))
    assert got.dtype == dtype and rel_err(got.double(), want) <= TOL[dtype]
    assert (got[x >= 4.5] == 0).all() and (want[x >= 4.5] == 0).all()
    assert ours(x[:0]).shape == (0, 1)


def test_grads_of_every_order():
    ref = MaceCutoff(r_max=5.0, p=5).double()
    ours = PolynomialCutoff.from_e3nn(ref)
    x = (torch.rand(40, 1, dtype=torch.float64) * 6.0).requires_grad_()
    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradgradcheck(ours, (x,))
    (g,) = torch.autograd.grad((ours(x) * x.sin()).sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad((ref(x) * x.sin()).sum(), x, create_graph=True)
    assert rel_err(g, g_ref) <= 1e-12
    assert rel_err(torch.autograd.grad(g.square().sum(), x)[0], torch.autograd.grad(g_ref.square().sum(), x)[0]) <= 1e-12


def test_keeps_mace_buffers_and_reads_a_loaded_degree():
    ref = MaceCutoff(r_max=4.0, p=5).double()
    ours = PolynomialCutoff.from_e3nn(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    other = MaceCutoff(r_max=3.0, p=7).double()
    ours.load_state_dict(other.state_dict())
    x = distances(torch.float64, 4.0)
    assert ours.desc.p == 7 and rel_err(ours(x), other(x)) <= 1e-12


def test_refuses_non_float():
    ours = PolynomialCutoff.from_e3nn(MaceCutoff(r_max=4.0, p=5))
    with pytest.raises(TypeError, match="floating distances"):
        ours(torch.ones(3, 1, dtype=torch.long))


def test_patch_unpatch_in_mace_and_fewer_ops():
    from sparsekern.integrations.mace.models import mace_mp0_shaped

    model = mace_mp0_shaped("small", dtype=torch.float64)
    ref = model.radial_embedding.cutoff_fn
    x = distances(torch.float64, float(ref.r_max)).requires_grad_()

    def ops_of(cutoff):
        """(forward, with the forces' derivative and its gradient)."""
        with AtenOps() as ops:
            y = cutoff(x)
            forward = ops.n
            (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
            torch.autograd.grad(g.sum(), x)
        return forward, ops.n

    want, ref_ops = ref(x), ops_of(ref)
    sparsekern.patch(model, backend="torch")
    ours = model.radial_embedding.cutoff_fn
    assert isinstance(ours, PolynomialCutoff) and rel_err(ours(x), want) <= 1e-12
    (forward, total), (ref_forward, ref_total) = ops_of(ours), ref_ops  # 10 / 55 against 26 / 108
    assert forward <= 0.4 * ref_forward and total <= 0.55 * ref_total, (ops_of(ours), ref_ops)
    sparsekern.unpatch(model)
    assert type(model.radial_embedding.cutoff_fn) is MaceCutoff and model.radial_embedding.cutoff_fn.p == ref.p
