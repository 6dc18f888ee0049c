"""The magnetic energy's closed-form first step: E_mag is linear in its output layers,
so energies and magnetic forces made by a module with known output layers (and any
per-element energy offsets) give those layers back exactly."""

import numpy as np
import pytest
import torch

from sparsekern.magnetism.fit import normal_equations, solve, zero_outputs
from sparsekern.magnetism.graph import collate, magnetic_graph

from test_energy_symmetry import cell_atoms, random_module


def numbered(parts):
    """(batch, targets, index of its first frame, no weights) of each (batch, targets) of one process."""
    starts = np.cumsum([0] + [b.n_frames for b, _ in parts])
    return [(b, targets, int(first), {}) for (b, targets), first in zip(parts, starts)]


def batches(module, n_batches, size=8, seed=0):
    """Batches of random cells with random moments (5 atoms, Ni, O and Fe)."""
    rng = np.random.default_rng(seed)
    graphs = [magnetic_graph(atoms, module.cutoff, m * rng.uniform(0.5, 1.5))
              for atoms, m in (cell_atoms(seed + k) for k in range(n_batches * size))]
    return [collate(graphs[k * size:(k + 1) * size], "cpu") for k in range(n_batches)]


@pytest.mark.parametrize("spin_orbit", [False, True])
@pytest.mark.parametrize("with_magforces,landau_b", [(False, 0.7), (True, 0.7), (True, -1.0)])
def test_fit_recovers_the_output_layers(spin_orbit, with_magforces, landau_b):
    """Landau b constant (its row's weights 0, which the fit leaves out): 0.7, fitted
    with the rest, or -1, which E_mag clamps to 0: the bound b >= 0 holds, and the rest
    is fitted at b = 0."""
    truth = random_module(spin_orbit)
    with torch.no_grad():
        truth.onsite[-1].weight[1].zero_()
        truth.onsite[-1].bias[1] = landau_b
    fitted = random_module(spin_orbit)  # same hidden layers (same seed) ...
    zero_outputs(fitted)  # ... output layers at the zero start
    train, test = batches(truth, 6), batches(truth, 1, seed=100)  # 48 frames: more than 40 unknowns
    offsets = torch.zeros(119, dtype=torch.float64)
    offsets[[28, 8, 26]] = torch.tensor([-5.5, -3.25, -8.0], dtype=torch.float64)  # per-element energies the base got wrong
    parts = []
    for b in train:
        e, f, h = (t.detach() for t in truth.energy_and_forces(b))
        shift = torch.zeros_like(e).index_add_(0, b.frame, offsets[b.numbers])
        parts.append((b, {"energy": e + shift, "forces": f, **({"magforces": h} if with_magforces else {})}))
    n = sum(b.moments.numel() for b in train)
    solve(fitted, normal_equations(fitted, numbered(parts), {"energy": 6 * 8, "forces": n, "magforces": n}),
          {"energy": 1.0, "forces": 10.0, "magforces": 100.0})
    for want, got in zip(truth.energy_and_forces(test[0]), fitted.energy_and_forces(test[0])):
        # not to round-off: the ridge GCV picks biases near-collinear features a little
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max() / want.abs().max()
    assert float(fitted.onsite[-1].bias[1]) == pytest.approx(max(landau_b, 0.0), abs=1e-4)


@pytest.mark.parametrize("spin_orbit", [False, True])
def test_fit_uses_the_stresses_of_the_labelled_frames(spin_orbit):
    """16 frames' energies alone cannot fix the 39 + 3 unknowns; with the stresses of half
    of them (the others NaN: no label) they do, and the fitted module's stresses are the
    truth's."""
    truth = random_module(spin_orbit)
    with torch.no_grad():
        truth.onsite[-1].weight[1].zero_()
        truth.onsite[-1].bias[1] = -1.0
    fitted = random_module(spin_orbit)
    zero_outputs(fitted)
    train, test = batches(truth, 2), batches(truth, 1, seed=100)
    parts = []
    for b in train:
        out = {k: t.detach() for k, t in truth.outputs(b, stress=True).items()}
        stress = out["stress"].clone()
        stress[1::2] = torch.nan
        parts.append((b, {"energy": out["energy"], "stress": stress}))
    solve(fitted, normal_equations(fitted, numbered(parts), {"energy": 16, "stress": 9 * 8}),
          {"energy": 1.0, "stress": 1e3})
    want, got = (m.outputs(test[0], stress=True) for m in (truth, fitted))
    for key in ("energy", "stress", "forces"):
        assert (got[key] - want[key]).abs().max() <= 1e-5 * want[key].abs().max(), key


def test_folds_are_one_process_s_in_any_number_of_processes():
    """Two processes, each with every other batch: their normal equations sum to one
    process's (the folds follow the frames' global index; counted per process, they
    differed and the fit chose another ridge)."""
    module = random_module()
    truth = random_module(seed=1)
    zero_outputs(module)
    parts = [(b, {"energy": truth(b, b.positions, b.moments).detach()}) for b in batches(module, 3, size=3)]
    one = normal_equations(module, numbered(parts), {"energy": 9})
    two = sum(normal_equations(module, numbered(parts)[rank::2], {"energy": 9}) for rank in (0, 1))
    assert one[:, 0].abs().sum(dim=(1, 2)).min() > 0  # every fold holds frames
    torch.testing.assert_close(two, one, rtol=1e-13, atol=0)


def test_strain_prior_rows_are_e_mag_s_change_under_the_strains():
    """The prior's term of the normal equations, at any parameters, is the mean square of
    E_mag's change per atom under each of STRAINS over the periodic frames (a molecule
    in the batch adds none), with their moments and turned parallel, over counts["strain"]."""
    from ase import Atoms

    from sparsekern.magnetism.fit import STRAINS, TERMS, _assign, ferromagnetic, n_linear

    module = random_module()
    zero_outputs(module)
    rng = np.random.default_rng(3)
    molecule = Atoms(numbers=[28, 8], positions=[[0, 0, 0], [0, 0, 1.8]])
    graphs = [magnetic_graph(a, module.cutoff, m) for a, m in map(cell_atoms, range(3))]
    graphs.append(magnetic_graph(molecule, module.cutoff, rng.normal(size=(2, 3))))
    batch = collate(graphs, "cpu")
    system = normal_equations(module, numbered([(batch, {})]), {"strain": 7})
    theta = torch.randn(n_linear(module), dtype=torch.float64)
    phi = torch.cat([theta, torch.zeros(system.shape[-1] - 1 - len(theta), dtype=torch.float64)])
    _assign(module, theta)
    aligned = ferromagnetic(batch)
    assert torch.allclose(aligned.moments.norm(dim=1), batch.moments.norm(dim=1))
    assert (aligned.moments[:, :2] == 0).all()
    with torch.no_grad():
        natoms = torch.bincount(batch.frame).double()
        want = sum(float((((module.strained(b, s) - module(b, b.positions, b.moments)) / natoms)[:3] ** 2).sum())
                   for b in (batch, aligned) for s in STRAINS) / 7
    got = float(phi @ system[:, TERMS.index("strain")].sum(0)[:-1, :-1] @ phi)
    assert got == pytest.approx(want, rel=1e-10) and want > 0


def test_at_the_bound_the_same_objective_is_minimised():
    """Where the unbounded solution has b < 0, the solution has b = 0 and minimises the
    same penalised objective over the other parameters (its gradient 0 there, and >= 0 in
    b: raising b would not lower it), the penalty the whole problem's."""
    from sparsekern.magnetism.fit import _Problem

    truth = random_module()
    with torch.no_grad():
        truth.onsite[-1].weight[1].zero_()
        truth.onsite[-1].bias[1] = -1.0  # (clamped to 0 in truth; an unbounded fit goes below)
        truth.onsite[-1].bias[0] = -30.0
    fitted = random_module()
    zero_outputs(fitted)
    parts = [(b, {k: t.detach() for k, t in zip(("energy", "forces", "magforces"), truth.energy_and_forces(b))})
             for b in batches(truth, 2)]
    n = sum(b.moments.numel() for b, _ in parts)
    system = normal_equations(fitted, numbered(parts), {"energy": 16, "forces": n, "magforces": n}).sum(0)
    w = torch.tensor([1.0, 1.0, 100.0, 0.0, 0.0], dtype=torch.float64)
    k = len(system[0]) - 1 - 119
    full = _Problem(system, w, k)
    unbounded = _Problem(system, w, k)
    unbounded.bounded = False
    ridge = 1e-3
    theta = full.fit(ridge, "residual")[:k]
    assert theta[-1] == 0
    g, o = full.g, full.offsets
    cross = g[:k, k:]
    gram, rhs = g[:k, :k] - cross @ o @ cross.T, full.b["residual"][:k] - cross @ o @ full.b["residual"][k:]
    lam = ridge * full.eig.max()
    grad = 2 * (gram @ theta - rhs) + 2 * lam * full.scale ** 2 * theta
    assert grad[:-1].abs().max() <= 1e-9 * rhs.abs().max() and grad[-1] >= 0


def test_fit_needs_the_zero_start():
    with pytest.raises(ValueError, match="zero start"):
        normal_equations(random_module(), [], {})


def test_fit_keeps_zero_where_the_moments_explain_nothing():
    """Energies that do not depend on the moments (a per-element constant plus noise): no
    coupling beats E_mag = 0 on the held-out frames, so the fit leaves the module at zero
    (the base model exactly). One frame: nothing to hold out, E_mag = 0 too."""
    module = random_module()
    zero_outputs(module)
    train = batches(module, 6)
    g = torch.Generator().manual_seed(0)
    parts = []
    for b in train:
        natoms = torch.zeros(b.n_frames, dtype=torch.float64).index_add_(0, b.frame, torch.ones(len(b.frame),
                                                                                                  dtype=torch.float64))
        noise = 1e-3 * natoms * torch.randn(b.n_frames, generator=g, dtype=torch.float64)
        parts.append((b, {"energy": -3.0 * natoms + noise, "forces": torch.zeros(len(b.frame), 3, dtype=torch.float64)}))
    n = sum(len(b.frame) for b in train)
    choice = solve(module, normal_equations(module, numbered(parts), {"energy": 48, "forces": 3 * n}),
                   {"energy": 1.0, "forces": 100.0})
    assert choice["ridge"] is None and choice["held_out_loss_without"] > 0
    assert all(not p.any() for layer in (module.pair[-1], module.onsite[-1]) for p in layer.parameters())
    one = batches(module, 1, size=1)[0]
    e, f, h = (t.detach() for t in random_module().energy_and_forces(one))
    choice = solve(module, normal_equations(module, [(one, {"energy": e, "magforces": h}, 0, {})],
                                            {"energy": 1, "magforces": 3}), {"energy": 1.0, "magforces": 100.0})
    assert choice["ridge"] is None and choice["held_out_loss"] is None


def test_the_fit_weighs_its_rows_as_the_loss_weighs_them():
    """normal_equations: a weight-0 entry is an unlabelled one (left out), weights of 4 a
    system four times as large."""
    module, truth = random_module(), random_module(seed=1)
    zero_outputs(module)
    (b,) = batches(module, 1, size=3)
    e, f, h = (t.detach() for t in truth.energy_and_forces(b))
    counts = {"energy": 3, "forces": f.numel(), "magforces": h.numel()}
    targets = {"energy": e, "forces": f, "magforces": h}
    plain = normal_equations(module, [(b, targets, 0, {})], counts)
    fours = {k: torch.full((v.numel(),), 4.0, dtype=torch.float64) for k, v in targets.items()}
    torch.testing.assert_close(normal_equations(module, [(b, targets, 0, fours)], counts), 4 * plain, rtol=1e-12,
                               atol=0)
    zero = torch.ones(f.numel(), dtype=torch.float64)
    zero[:6] = 0.0
    nan = f.clone().reshape(-1)
    nan[:6] = torch.nan
    torch.testing.assert_close(normal_equations(module, [(b, targets, 0, {"forces": zero})], counts),
                               normal_equations(module, [(b, {**targets, "forces": nan.reshape(f.shape)}, 0, {})],
                                                counts), rtol=1e-12, atol=0)
