"""A patched MACE model called the ways a user's code calls one: under inference_mode
first and with autograd after, evaluated with an EMA's weights swapped in through
``.data`` (torch_ema, as MACE's trainer validates) and back, cast in place after a call.
What the layers cache between calls (planned orderings, constants, weights derived from
frozen weights) must never hand a later call a stale or an inference tensor: each call
computes what the unpatched model computes."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
from ase import Atoms  # noqa: E402
from e3nn import o3  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped  # noqa: E402


def _model(dtype=torch.float64):
    return mace_mp0_shaped("small", seed=1, dtype=dtype, num_elements=2, atomic_numbers=[6, 8], max_ell=2,
                           correlation=2, hidden_irreps=o3.Irreps("4x0e+4x1o"), r_max=3.0, radial_MLP=[8, 8],
                           num_bessel=4, atomic_energies=[-3.0, -2.0])


def _batch(model, dtype=torch.float64):
    rng = np.random.default_rng(0)
    frames = [Atoms("C4O3", positions=rng.normal(size=(7, 3))), Atoms("CO", positions=[[0, 0, 0], [1.1, 0.2, 0]])]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in mace_batch(model, frames).items()}


def _call(model, batch, **flags):
    return model({k: v.clone() for k, v in batch.items()}, **flags)


def _pair(dtype=torch.float64):
    plain = _model(dtype)
    return plain, sparsekern.patch(copy.deepcopy(plain), backend="torch")


def test_inference_mode_first_then_autograd():
    plain, patched = _pair()
    batch = _batch(plain)
    with torch.inference_mode():  # constants and plans built here are kept for later calls
        _call(patched, batch, training=False, compute_force=False)
    got = _call(patched, batch, training=True, compute_force=True)
    want = _call(plain, batch, training=True, compute_force=True)
    assert torch.allclose(got["forces"], want["forces"], rtol=1e-12, atol=1e-14)
    got["forces"].square().sum().backward()  # (double backward through what was kept)


def test_a_model_prepared_for_fine_tuning_under_inference_mode():
    """Frozen base weights beside trainable deltas: what the layers derive from both
    (the delta's value is an inference tensor there) is built afresh, as under no_grad;
    the density, set again where the deltas moved, is set alike under inference_mode."""
    from sparsekern.finetune import SparseConfig
    from sparsekern.finetune.density import set_schedule_step

    plain = _model()
    batch = _batch(plain)
    models = []
    for _ in range(2):
        model = sparsekern.prepare(sparsekern.patch(copy.deepcopy(plain), backend="torch"), SparseConfig(density=0.05))
        set_schedule_step(model, 1)  # past the first step: at the target density
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        models.append(model)
    with torch.no_grad():
        want = _call(models[0], batch, training=False, compute_force=False)["energy"]
    for model in models:
        with torch.inference_mode():
            got = _call(model, batch, training=False, compute_force=False)["energy"]
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert not torch.allclose(want, _call(plain, batch, training=False, compute_force=False)["energy"].detach(),
                              rtol=1e-9, atol=0)


def test_a_prepared_model_in_mace_s_calculator_is_not_trained_by_its_calls():
    """MACE's calculator leaves the model in training mode (and freezes its parameters):
    its calls are not training steps, so the density controller leaves the deltas as
    they are (it switched on the delta's random start at the first call)."""
    from ase.build import molecule
    from mace.calculators import MACECalculator

    from sparsekern.finetune import SparseConfig, stats

    model = sparsekern.prepare(sparsekern.patch(_model()), SparseConfig(density=0.05))
    calc = MACECalculator(models=model, device="cpu", default_dtype="float64")
    atoms = molecule("CO2")
    energies = []
    for _ in range(3):
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        calc.reset()
    assert energies[0] == energies[1] == energies[2] and stats(model)["density"] == 0.0


def test_ema_weights_swapped_in_through_data_and_back():
    """torch_ema's ``average_parameters`` writes the weights through ``.data`` (no
    version counted): a no_grad validation with the averages, then the live weights."""
    from torch_ema import ExponentialMovingAverage

    plain, patched = _pair()
    batch = _batch(plain)
    energies = {}
    for name, model in (("plain", plain), ("patched", patched)):
        ema = ExponentialMovingAverage(model.parameters(), decay=0.5)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        _call(model, batch, training=True, compute_force=False)["energy"].sum().backward()
        optimizer.step()  # the live weights leave the average's
        with torch.no_grad():
            with ema.average_parameters():
                averaged = _call(model, batch, training=False, compute_force=False)["energy"]
            energies[name] = (averaged, _call(model, batch, training=False, compute_force=False)["energy"])
    for got, want in zip(energies["patched"], energies["plain"]):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(*energies["plain"])  # (the average is another model)


def test_cast_in_place_after_a_call():
    plain, patched = _pair(torch.float32)
    with torch.no_grad():
        _call(patched, _batch(plain, torch.float32), training=False, compute_force=False)
    plain.double(), patched.double()  # Module._apply: .data replaced, versions kept
    for p in patched.parameters():
        p.requires_grad_(False)  # frozen: what the layers derive from the weights is kept
    batch = _batch(plain)
    with torch.no_grad():
        got = _call(patched, batch, training=False, compute_force=False)["energy"]
        want = _call(plain, batch, training=False, compute_force=False)["energy"]
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-14)
