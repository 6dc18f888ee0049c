"""The magnetic terms of the loss: a collinear magnetic-force label gives one component
per atom (along the moments' axis), which the residuals, the weights and the errors
count once, beside 3-vector labels that count three times."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase.build import bulk

from sparsekern.magnetism.labels import read_moment_labels
from sparsekern.magnetism.loss import magnetic_errors, magnetic_loss, magnetic_residuals, magnetic_weights


def _collinear_atoms():
    atoms = bulk("Fe", "bcc", a=2.87, cubic=True).repeat((3, 1, 1))
    atoms.arrays["m"] = np.array([2.2, -2.1, 2.0, -1.9, 2.3, -2.4])
    atoms.arrays["h"] = np.array([0.3, -0.1, 0.2, 0.05, -0.4, 0.1])
    return atoms


def test_collinear_labels_leave_the_transverse_components_unlabelled():
    atoms = _collinear_atoms()
    moments, magforces = read_moment_labels(atoms, "frame 0", "m", "h")
    assert np.array_equal(moments, np.outer(atoms.arrays["m"], [0.0, 0.0, 1.0]))
    assert np.isnan(magforces[:, :2]).all() and np.array_equal(magforces[:, 2], atoms.arrays["h"])


def test_collinear_and_vector_labels_each_count_their_components():
    rng = np.random.default_rng(0)
    _, collinear = read_moment_labels(_collinear_atoms(), "frame 0", "m", "h")
    vector = rng.normal(size=(4, 3))
    batch = [SimpleNamespace(magforces=torch.as_tensor(h), magmom=None, natoms=len(h)) for h in (collinear, vector)]
    guess = rng.normal(size=(10, 3))
    predicted = torch.as_tensor(guess)
    res = magnetic_residuals({"magforces": predicted}, batch)["magforces"]
    want = np.concatenate([guess[:6, 2] - collinear[:, 2], (guess[6:] - vector).reshape(-1)])
    assert res.shape == (18,) and np.allclose(res.numpy(), want, rtol=0, atol=1e-15)
    settings = SimpleNamespace(magforces_weight=7.0, magmom_weight=0.0)
    assert magnetic_weights(batch, settings, batch) == {"magforces": pytest.approx(7.0 / 18)}
    out = {"magforces": predicted, "energy": torch.zeros(2, dtype=torch.float64)}
    loss = magnetic_loss(out, batch, settings, batch)
    assert float(loss) == pytest.approx(7.0 * np.mean(want ** 2), rel=1e-12)
    assert magnetic_errors({"magforces": res})["magforce_mae_mev_per_muB"] == pytest.approx(1e3 * np.abs(want).mean())


def test_the_loss_of_collinear_labels_is_differentiable_where_labelled_only():
    _, collinear = read_moment_labels(_collinear_atoms(), "frame 0", "m", "h")
    batch = [SimpleNamespace(magforces=torch.as_tensor(collinear), magmom=None, natoms=6)]
    predicted = torch.zeros(6, 3, dtype=torch.float64, requires_grad=True)
    settings = SimpleNamespace(magforces_weight=1.0, magmom_weight=0.0)
    magnetic_loss({"magforces": predicted, "energy": predicted.new_zeros(1)}, batch, settings, batch).backward()
    assert torch.isfinite(predicted.grad).all() and not predicted.grad[:, :2].any()
    assert torch.allclose(predicted.grad[:, 2], -2 * torch.as_tensor(collinear[:, 2]) / 6)


def test_moments_are_scored_where_the_model_gives_one():
    """An atom whose moment is 0 gets 0 from the model whatever the head says
    (``oriented``): its magnitude is not scored, nor counted in the weight."""
    magmom = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, -2.0]], dtype=torch.float64)
    batch = [SimpleNamespace(magforces=None, magmom=magmom, natoms=3)]
    head = torch.tensor([0.7, 1.5, 1.0], dtype=torch.float64)
    res = magnetic_residuals({"magmom": head}, batch)["magmom"]
    assert torch.allclose(res, torch.tensor([0.5, -1.0], dtype=torch.float64))
    settings = SimpleNamespace(magforces_weight=1.0, magmom_weight=3.0)
    assert magnetic_weights(batch, settings, batch) == {"magmom": 1.5}
    assert magnetic_errors({"magmom": res})["magmom_mae_muB"] == pytest.approx(0.75)
