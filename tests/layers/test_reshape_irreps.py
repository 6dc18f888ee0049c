"""ReshapeIrreps: MACE's ``reshape_irreps`` values (both layouts, bit for bit), derivatives,
patch / unpatch in a MACE model, its op count against MACE's, and what it refuses."""

import pytest
import torch
from e3nn import o3

import sparsekern
from helpers import AtenOps

pytest.importorskip("mace")
from mace.modules.irreps_tools import reshape_irreps  # noqa: E402
from mace.modules.wrapper_ops import CuEquivarianceConfig  # noqa: E402

from sparsekern.layers import ReshapeIrreps  # noqa: E402

IRREPS = o3.Irreps("3x0e+3x1o+3x2e+3x3o")
LAYOUTS = {"none": None, "mul_ir": CuEquivarianceConfig(),
           "ir_mul": CuEquivarianceConfig(layout="ir_mul", layout_str="ir_mul")}


def _x(n=7, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, IRREPS.dim, dtype=torch.float64, generator=g).requires_grad_(requires_grad)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_mace(layout):
    ref = reshape_irreps(IRREPS, cueq_config=LAYOUTS[layout])
    ours = ReshapeIrreps.from_e3nn(ref)
    for x in (_x(), _x(0), _x().float()):
        assert torch.equal(ours(x), ref(x))  # data movement: bit for bit
    x = _x(requires_grad=True)
    assert torch.autograd.gradcheck(ours, (x,)) and torch.autograd.gradgradcheck(ours, (x,))


def _ops(module, x):
    """(forward, +backward, +double backward) aten ops of a force-training-like pass."""
    with AtenOps() as ops:
        y = module(x)
        counts = [ops.n]
        (g,) = torch.autograd.grad((y * y.detach().sin()).square().sum(), x, create_graph=True)
        counts.append(ops.n)
        g.square().sum().backward()
    return counts + [ops.n]


def test_patch_unpatch_in_mace_and_fewer_ops():
    """In MACE-MP-0 small's second interaction (4 blocks of 128 channels), the layer's
    forward / +backward / +double backward: 2 / 15 / 34 aten ops against MACE's 9 / 38 /
    86 (the loss's own ops included)."""
    from sparsekern.integrations.mace.models import mace_mp0_shaped

    model = mace_mp0_shaped("small", dtype=torch.float64)
    ref = model.interactions[1].reshape
    x = torch.randn(7, ref.irreps.dim, dtype=torch.float64, requires_grad=True)
    want, ref_ops = ref(x), _ops(ref, x)
    sparsekern.patch(model, backend="torch")
    ours = model.interactions[1].reshape
    assert isinstance(ours, ReshapeIrreps) and torch.equal(ours(x), want)
    got_ops = _ops(ours, x)
    print(f"reshape aten ops (fwd, +bwd, +dbl): {got_ops}, MACE's {ref_ops}")  # shown with -s
    assert all(o <= 0.45 * r for o, r in zip(got_ops, ref_ops)), (got_ops, ref_ops)
    sparsekern.unpatch(model)
    assert type(model.interactions[1].reshape) is reshape_irreps


def test_refuses():
    ours = ReshapeIrreps.from_e3nn(reshape_irreps(IRREPS))
    with pytest.raises(ValueError, match="last dimension 5, but its irreps 3x0e.* have dimension 48"):
        ours(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected features of shape"):
        ours(torch.zeros(2, 3, IRREPS.dim, dtype=torch.float64))
    uneven = reshape_irreps(o3.Irreps("3x0e+2x1o"))
    assert "multiplicities differ" in ReshapeIrreps.unsupported_reason(uneven)
    model = torch.nn.Sequential(uneven)
    sparsekern.patch(model, backend="torch")
    assert type(model[0]) is reshape_irreps  # left as it is (MACE's own concatenation fails there)
