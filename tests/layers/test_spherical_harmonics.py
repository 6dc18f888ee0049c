"""SphericalHarmonics: e3nn's values (l <= 3, every normalization, with and without
normalizing the vector), derivatives of all orders, equivariance, e3nn's zero-vector
behaviour, and what it refuses."""

import pytest
import torch
from e3nn import o3

import sparsekern
from sparsekern.layers import SphericalHarmonics
from helpers import TOL, random_o3, rel_err

CASES = [(o3.Irreps.spherical_harmonics(3), True, "component"),  # MACE's
         ("1x1o+1x3o", True, "integral"), ("0e+1o+2e", False, "norm"), ("2x1o+1x0e", True, "component"),
         (o3.Irreps.spherical_harmonics(2, p=1), True, "integral")]  # a pseudovector's


@pytest.mark.parametrize("irreps,normalize,normalization", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_e3nn(irreps, normalize, normalization, dtype):
    ref = o3.SphericalHarmonics(irreps, normalize, normalization)
    ours = SphericalHarmonics.from_e3nn(ref)
    x = torch.randn(7, 11, 3, dtype=dtype)  # any leading shape
    assert ours.irreps_out == ref.irreps_out
    assert rel_err(ours(x), ref.to(dtype)(x)) <= TOL[dtype]
    assert ours(x[:0]).shape == (0, 11, ref.irreps_out.dim)  # no edges


def test_grads_of_every_order():
    sh = SphericalHarmonics(o3.Irreps.spherical_harmonics(3), True, "component")
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sh, (x,))
    assert torch.autograd.gradgradcheck(sh, (x,))
    ref = o3.SphericalHarmonics(o3.Irreps.spherical_harmonics(3), True, "component")
    (g,) = torch.autograd.grad(sh(x).sin().sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad(ref(x).sin().sum(), x, create_graph=True)
    assert rel_err(g, g_ref) <= 1e-12
    assert rel_err(torch.autograd.grad(g.square().sum(), x)[0], torch.autograd.grad(g_ref.square().sum(), x)[0]) <= 1e-12


def test_equivariant_and_zero_vector_as_e3nn():
    irreps = o3.Irreps.spherical_harmonics(3)
    ref = o3.SphericalHarmonics(irreps, True, "component").double()
    sh = SphericalHarmonics.from_e3nn(ref)
    rot = random_o3()
    x = torch.randn(20, 3, dtype=torch.float64)
    d = irreps.D_from_matrix(rot)
    # e3nn >= 0.5's D matrices hold to ~1e-7 (0.4.4: ~1e-15): never worse than e3nn's own
    e3nn_err = rel_err(ref(x @ rot.T), ref(x) @ d.T)
    assert rel_err(sh(x @ rot.T), sh(x) @ d.T) <= max(1e-12, 2 * e3nn_err)
    zero = torch.zeros(1, 3, dtype=torch.float64)
    assert rel_err(sh(zero), ref(zero)) <= 1e-12  # 1 for l = 0, zeros elsewhere, no NaN


def test_patch_replaces_and_unpatch_restores():
    model = torch.nn.Sequential(o3.SphericalHarmonics(o3.Irreps.spherical_harmonics(3), True, "component"))
    x = torch.randn(5, 3)
    before = model(x)
    sparsekern.patch(model)
    assert isinstance(model[0], SphericalHarmonics)
    assert rel_err(model(x), before) <= 1e-5
    sparsekern.unpatch(model)
    assert type(model[0]) is o3.SphericalHarmonics and torch.equal(model(x), before)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r"l = 4 > 3"):
        SphericalHarmonics(o3.Irreps.spherical_harmonics(4), True, "component")
    sh = SphericalHarmonics("1x0e+1x1o", True)
    with pytest.raises(ValueError, match=r"vectors of shape \(\.\.\., 3\), got \(5, 2\)"):
        sh(torch.randn(5, 2))
    with pytest.raises(ValueError, match="vectors of shape"):
        sh(torch.ones(5, 3, dtype=torch.long))
