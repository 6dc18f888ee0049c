"""Moments out: the self-consistent moments (LBFGS on E(R, m) at fixed R) and the
moment head's orientation along reference moments."""

import numpy as np
import pytest
import torch
from ase import Atoms

from sparsekern.magnetism.energy import ENERGY_SCALE, MagneticEnergy
from sparsekern.magnetism.graph import collate, magnetic_graph
from sparsekern.magnetism.moments import MomentHead, equilibrium_moments, oriented
from test_energy_symmetry import random_module


def _batch(module, moments):
    rng = np.random.default_rng(0)
    atoms = Atoms(numbers=[26] * 4, cell=np.eye(3) * 3.6, pbc=True, scaled_positions=rng.uniform(0, 1, (4, 3)))
    return collate([magnetic_graph(atoms, module.cutoff, moments)], "cpu")


def test_equilibrium_of_landau_terms_is_analytic():
    torch.manual_seed(0)
    module = MagneticEnergy(cutoff=3.0, n_basis=4, width=8).double()
    a, b = -0.8, 0.5  # per-atom a|m|^2 + b|m|^4: minimum at |m|^2 = -a / (2 b)
    with torch.no_grad():
        module.onsite[2].bias.copy_(torch.tensor([a, b]) / ENERGY_SCALE)
    start = np.random.default_rng(1).normal(0, 1, (4, 3))
    m = equilibrium_moments(module, _batch(module, start))
    assert torch.allclose(m.norm(dim=1), torch.full((4,), np.sqrt(-a / (2 * b)), dtype=torch.float64), atol=1e-6)
    # directions are free without exchange: they stay the start's
    unit = start / np.linalg.norm(start, axis=1)[:, None]
    assert torch.allclose(m / m.norm(dim=1, keepdim=True), torch.as_tensor(unit), atol=1e-6)


def _with_exchange():
    """Random pair couplings and an on-site well a|m|^2 + b|m|^4 with a = -1, b = 2."""
    module = random_module(cutoff=3.0, n_basis=4)
    with torch.no_grad():
        module.onsite[2].weight.zero_()
        module.onsite[2].bias.copy_(torch.tensor([-1.0, 2.0]) / ENERGY_SCALE)
    return module


def test_equilibrium_with_exchange_has_zero_magnetic_forces():
    module = _with_exchange()
    batch = _batch(module, np.random.default_rng(2).normal(0, 1, (4, 3)))
    e0 = float(module(batch, batch.positions, batch.moments).detach())
    batch.moments = equilibrium_moments(module, batch)
    e, _, magforces = module.energy_and_forces(batch)
    assert float(e) < e0 and float(magforces.abs().max()) < 1e-5


def test_head_orients_magnitudes_along_reference_moments():
    module = MagneticEnergy(cutoff=3.0, n_basis=4, width=8).double()
    head = MomentHead(8).double()
    reference = np.array([[0, 0, 2.0], [0, 0, -1.0], [0, 0, 0], [1.0, 0, 0]])
    batch = _batch(module, reference)
    size = head(module, batch)
    m = oriented(size, batch.moments).detach()
    assert (size > 0).all()
    assert m[0, 2] > 0 and m[1, 2] < 0 and not m[2].any() and m[3, 0] > 0 and not m[3, 1:].any()
    assert torch.allclose(m.norm(dim=1)[[0, 1, 3]], size.detach()[[0, 1, 3]])


def test_head_on_the_energy_pass_node_features():
    """The moment head on the node features the energy pass built (as the family runs
    it) gives the moments and parameter gradients of the head building them itself."""
    module = random_module(False)
    head = MomentHead(module.width).double()
    batch = _batch(module, np.random.default_rng(1).normal(size=(4, 3)))
    *_, node = module.energy_and_forces(batch, create_graph=True, with_nodes=True)
    params = list(module.parameters()) + list(head.parameters())
    own, shared = head(module, batch), head(module, batch, node)
    assert torch.equal(own, shared)
    for a, b in zip(torch.autograd.grad(own.square().sum(), params, allow_unused=True),
                    torch.autograd.grad(shared.square().sum(), params, allow_unused=True)):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-12, atol=0))


def test_equilibrium_keeps_non_magnetic_atoms_at_zero():
    module = _with_exchange()
    start = np.random.default_rng(3).normal(0, 1, (4, 3))
    start[1] = 0.0
    m = equilibrium_moments(module, _batch(module, start))
    assert not m[1].any() and (m[[0, 2, 3]].norm(dim=1) > 0.1).all()


def test_an_energy_without_a_minimum_in_the_moments_is_said_not_returned():
    """a < 0 with b = 0 on two of the four atoms: E_mag falls without bound as their |m|
    grows, and the search says so instead of returning moments that ran away."""
    module = MagneticEnergy(cutoff=3.0, n_basis=4, width=8).double()
    batch = _batch(module, np.random.default_rng(1).normal(0, 1, (4, 3)))
    node = module.geometry(batch, batch.positions)[-1].detach()
    with torch.no_grad():  # b's row on the output layer's input: b = 1, 0 (clamped), 1, 0 on the four atoms
        hidden = module.onsite[:2](node)
        module.onsite[2].weight[1] = torch.linalg.lstsq(hidden, torch.tensor([1.0, -1.0, 1.0, -1.0]).double()).solution
        module.onsite[2].bias.copy_(torch.tensor([-0.5, 0.0]) / ENERGY_SCALE)
    assert module.landau(node)[1].ne(0).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match=r"E_mag has no minimum in \|m\| from these moments .* unbounded below"):
        equilibrium_moments(module, batch)


@pytest.mark.parametrize("a", [-0.5, 0.5])
def test_an_energy_quadratic_in_the_moments_is_refused(a):
    """b = 0 on every atom (a fit that found no quartic term): E(cm) = c^2 E(m), whose
    only minimum is m = 0 (a > 0: LBFGS would return moments collapsed to 0) or none."""
    module = _with_exchange()
    with torch.no_grad():
        module.onsite[2].bias.copy_(torch.tensor([a, 0.0]) / ENERGY_SCALE)
    with pytest.raises(ValueError, match="E_mag is quadratic in the moments .* its only minimum is m = 0"):
        equilibrium_moments(module, _batch(module, np.random.default_rng(1).normal(0, 1, (4, 3))))
