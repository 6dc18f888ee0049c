"""The magnetic energy's physics, in float64 on a trained-looking (random) module:
rotations, spin rotations, time reversal, zero moments, collinear scalars, and the
exact zero at initialisation."""

import numpy as np
import pytest
import torch
from ase import Atoms
from scipy.spatial.transform import Rotation

from sparsekern.magnetism.energy import MagneticEnergy
from sparsekern.magnetism.graph import collate, magnetic_graph


def random_module(spin_orbit=False, seed=0, cutoff=3.5, n_basis=6, scale=0.3, dm="axial"):
    torch.manual_seed(seed)
    module = MagneticEnergy(cutoff=cutoff, n_basis=n_basis, width=8, spin_orbit=spin_orbit, dm=dm).double()
    with torch.no_grad():
        for p in module.parameters():  # leave the zero start: any trained state
            p.copy_(torch.randn_like(p) * scale)
    return module


def cell_atoms(seed=1):
    rng = np.random.default_rng(seed)
    cell = np.diag([4.2, 4.3, 4.1]) + rng.normal(0, 0.2, (3, 3))
    atoms = Atoms(numbers=[28, 28, 8, 8, 26], cell=cell, pbc=True,
                  scaled_positions=rng.uniform(0, 1, (5, 3)))
    return atoms, rng.normal(0, 1.2, (5, 3))


def evaluate(module, atoms, moments):
    batch = collate([magnetic_graph(atoms, module.cutoff, moments)], "cpu")
    return [t.detach() for t in module.energy_and_forces(batch)]


@pytest.mark.parametrize("spin_orbit", [False, True])
def test_common_rotation_of_positions_and_moments(spin_orbit):
    module, (atoms, m) = random_module(spin_orbit), cell_atoms()
    rot = Rotation.random(random_state=3).as_matrix()
    turned = atoms.copy()
    turned.set_cell(atoms.cell @ rot.T, scale_atoms=True)
    e, f, h = evaluate(module, atoms, m)
    e2, f2, h2 = evaluate(module, turned, m @ rot.T)
    assert abs(float(e)) > 1e-3  # a test that could fail
    assert torch.allclose(e2, e, rtol=1e-12, atol=1e-12)
    assert torch.allclose(f2, f @ torch.as_tensor(rot.T), atol=1e-11)
    assert torch.allclose(h2, h @ torch.as_tensor(rot.T), atol=1e-11)


def test_spin_rotation_alone_without_and_with_spin_orbit():
    atoms, m = cell_atoms()
    rot = Rotation.random(random_state=4).as_matrix()
    e, _, h = evaluate(random_module(False), atoms, m)
    e2, _, h2 = evaluate(random_module(False), atoms, m @ rot.T)
    assert torch.allclose(e2, e, rtol=1e-12, atol=1e-12)
    assert torch.allclose(h2, h @ torch.as_tensor(rot.T), atol=1e-11)
    e_soc, _, _ = evaluate(random_module(True), atoms, m)
    e_soc2, _, _ = evaluate(random_module(True), atoms, m @ rot.T)
    assert abs(float(e_soc2 - e_soc)) > 1e-6  # spin-orbit terms see the lattice


@pytest.mark.parametrize("spin_orbit", [False, True])
def test_time_reversal(spin_orbit):
    module, (atoms, m) = random_module(spin_orbit), cell_atoms()
    e, f, h = evaluate(module, atoms, m)
    e2, f2, h2 = evaluate(module, atoms, -m)
    assert torch.allclose(e2, e, rtol=1e-13, atol=1e-13)
    assert torch.allclose(f2, f, atol=1e-12)
    assert torch.allclose(h2, -h, atol=1e-12)  # -dE/dm is odd in m


@pytest.mark.parametrize("spin_orbit", [False, True])
def test_inversion(spin_orbit):
    """Positions through the origin, moments (axial) unchanged: the energy and magnetic
    forces stay, the forces turn. The polar Dzyaloshinskii-Moriya form does not."""
    module, (atoms, m) = random_module(spin_orbit), cell_atoms()
    inverted = atoms.copy()
    inverted.positions = -atoms.positions  # (the lattice is its own inverse)
    e, f, h = evaluate(module, atoms, m)
    e2, f2, h2 = evaluate(module, inverted, m)
    assert abs(float(e)) > 1e-3
    assert torch.allclose(e2, e, rtol=1e-12, atol=1e-12)
    assert torch.allclose(f2, -f, atol=1e-11) and torch.allclose(h2, h, atol=1e-11)
    polar = random_module(True, dm="polar")
    assert abs(float(evaluate(polar, inverted, m)[0] - evaluate(polar, atoms, m)[0])) > 1e-6


def _dm_energy(module, atoms, a, b):
    """D_01 . (a x b): the part of E_mag odd under swapping the moments a, b of atoms 0
    and 1 (the Heisenberg, pseudo-dipolar and, for atoms of one element and environment,
    on-site terms are even), other atoms without moments."""
    moments = np.zeros((len(atoms), 3))
    energies = []
    for first, second in ((a, b), (b, a)):
        moments[0], moments[1] = first, second
        energies.append(float(evaluate(module, atoms, moments)[0]))
    return (energies[0] - energies[1]) / 2


@pytest.mark.parametrize("dm", ["axial", "polar"])
def test_moriya_rules(dm):
    """Two Fe atoms on x, O atoms about them (no cell). With one O on +y, the bond's
    mirror planes are z = 0 and x = 0: D is along z. With O on +y and -y, the bond's
    midpoint is an inversion centre: D = 0. The polar form's D lies along the bond."""
    module = random_module(True, dm=dm)
    triangle = Atoms(numbers=[26, 26, 8], positions=[[-1.2, 0, 0], [1.2, 0, 0], [0, 1.4, 0]])
    centred = Atoms(numbers=[26, 26, 8, 8], positions=[[-1.2, 0, 0], [1.2, 0, 0], [0, 1.4, 0], [0, -1.4, 0]])
    x, y, z = np.eye(3)
    along = {axis: _dm_energy(module, triangle, *pair) for axis, pair in (("z", (x, y)), ("x", (y, z)), ("y", (z, x)))}
    centre = [_dm_energy(module, centred, *pair) for pair in ((x, y), (y, z), (z, x))]
    if dm == "polar":
        assert abs(along["x"]) > 1e-6 and abs(centre[1]) > 1e-6
        return
    assert abs(along["z"]) > 1e-6
    assert abs(along["x"]) < 1e-15 and abs(along["y"]) < 1e-15
    assert max(map(abs, centre)) < 1e-15


def test_non_magnetic_atom_contributes_nothing():
    module, (atoms, m) = random_module(True), cell_atoms()
    m[2] = 0.0
    batch = collate([magnetic_graph(atoms, module.cutoff, m)], "cpu")
    per_atom = module.atom_energies(batch, batch.positions, batch.moments).detach()
    assert float(per_atom[2]) == 0.0 and float(per_atom.abs().sum()) > 1e-3
    e, f, h = evaluate(module, atoms, np.zeros((5, 3)))
    assert float(e) == 0.0 and not f.any() and not h.any()


def test_collinear_scalars_are_moments_along_z():
    module, (atoms, m) = random_module(True), cell_atoms()
    s = m[:, 0]
    e, _, h = evaluate(module, atoms, s)
    e2, _, h2 = evaluate(module, atoms, np.outer(s, [0.0, 0.0, 1.0]))
    assert torch.equal(e, e2) and torch.equal(h, h2)
    with pytest.raises(ValueError, match=r"shape \(5, 2\)"):
        magnetic_graph(atoms, 3.5, m[:, :2])


def test_zero_at_initialisation_with_gradients():
    torch.manual_seed(0)
    module = MagneticEnergy(spin_orbit=True).double()
    atoms, m = cell_atoms()
    e, f, h = evaluate(module, atoms, m)
    assert float(e) == 0.0 and not f.any() and not h.any()
    batch = collate([magnetic_graph(atoms, module.cutoff, m)], "cpu")
    module(batch, batch.positions, batch.moments).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None and p.grad.any()}
    assert {"pair.2.weight", "onsite.2.weight", "onsite.2.bias"} <= set(grads)  # it can learn


def test_magnetic_forces_are_minus_the_gradient():
    module, (atoms, m) = random_module(True), cell_atoms()
    e, _, h = evaluate(module, atoms, m)
    step = 1e-6
    for k, c in ((0, 1), (4, 2)):
        mp, mm = m.copy(), m.copy()
        mp[k, c] += step
        mm[k, c] -= step
        numeric = -(evaluate(module, atoms, mp)[0] - evaluate(module, atoms, mm)[0]) / (2 * step)
        assert abs(float(numeric) - float(h[k, c])) < 1e-7


@pytest.mark.parametrize("spin_orbit", [False, True])
def test_stress_is_the_strain_derivative(spin_orbit):
    """E_mag's stress (1/V) dE/dstrain, by autograd through a strain of positions and cell
    offsets, against central differences of E_mag on strained cells (moments carried
    along unchanged), two frames in one batch; a non-periodic frame's is 0."""
    module = random_module(spin_orbit)
    frames = [cell_atoms(seed) for seed in (1, 2)]
    batch = collate([magnetic_graph(a, module.cutoff, m) for a, m in frames], "cpu")
    stress = module.outputs(batch, stress=True)["stress"].detach()
    assert stress.shape == (2, 3, 3) and float(stress.abs().max()) > 1e-4
    torch.testing.assert_close(stress, stress.transpose(1, 2), rtol=0, atol=1e-14)
    h = 1e-5
    for k, (atoms, m) in enumerate(frames):
        want = np.zeros((3, 3))
        for a in range(3):
            for b in range(3):
                energies = []
                for sign in (1, -1):
                    strain = np.eye(3)
                    strain[a, b] += sign * h / 2
                    strain[b, a] += sign * h / 2
                    strained = atoms.copy()
                    strained.set_cell(atoms.cell @ strain, scale_atoms=True)
                    energies.append(float(evaluate(module, strained, m)[0]))
                want[a, b] = (energies[0] - energies[1]) / (2 * h) / atoms.get_volume()
        np.testing.assert_allclose(stress[k].numpy(), want, rtol=1e-7, atol=1e-9)
    molecule, m = cell_atoms()
    molecule.pbc = False
    one = collate([magnetic_graph(molecule, module.cutoff, m)], "cpu")
    assert not module.outputs(one, stress=True)["stress"].any()


def test_a_file_from_before_the_axial_form_loads_with_the_polar_one(tmp_path):
    """Magnetic modules saved before the Dzyaloshinskii-Moriya form was a setting (no
    "dm" in their config) load with the polar form they were trained with: the same energies,
    in float64 (loading rounded the weights through float32)."""
    import json
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from sparsekern.magnetism.storage import load_magnetic, save_magnetic

    module, (atoms, m) = random_module(True, dm="polar"), cell_atoms()
    path = save_magnetic(SimpleNamespace(energy=module, head=None), tmp_path / "x.magnetic.safetensors")
    config = module.config()
    del config["dm"]
    save_file(load_file(path), str(path), metadata={"format": "sparsekern-magnetic", "config": json.dumps(config),
                                                    "head": "False"})
    loaded, head = load_magnetic(path, "cpu")
    assert loaded.dm == "polar" and head is None
    torch.testing.assert_close(evaluate(loaded, atoms, m)[0], evaluate(module, atoms, m)[0], rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="dm must be one of"):
        MagneticEnergy(dm="vector")


def test_compressed_frames_have_the_neighbours_that_come_within_the_cutoff():
    """The strain prior compresses each frame by up to 2 % with its own neighbours: the
    pairs just beyond the cutoff that then come within it are in the graph (fcc Fe at
    a = 3.55 A: the second shell at 3.55, a 3.5 A cutoff), so the strained energy is that
    of the strained frame's own graph."""
    from ase.build import bulk

    module = random_module(cutoff=3.5)
    atoms = bulk("Fe", "fcc", a=3.55, cubic=True)
    atoms.rattle(0.01, seed=0)
    moments = np.random.default_rng(0).normal(size=(len(atoms), 3))
    batch = collate([magnetic_graph(atoms, module.cutoff, moments)], "cpu")
    squeezed = atoms.copy()
    squeezed.set_cell(atoms.cell * 0.98, scale_atoms=True)
    own = collate([magnetic_graph(squeezed, module.cutoff, moments)], "cpu")
    with torch.no_grad():
        want = module(own, own.positions, own.moments)
        got = module.strained(batch, -0.02 * torch.eye(3, dtype=torch.float64))
    assert float(abs(got - want)) <= 1e-12 * float(abs(want))


def test_a_spin_orbit_calculator_takes_atoms_without_moments():
    """ASE's moments of a structure that has none are zeros (n,): no magnetism, not
    collinear moments, so E_mag (0 at m = 0) adds nothing, and a warning says so (a
    user who forgot the moments gets the base model's energy)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from sparsekern.magnetism.calculator import MagneticCalculator

    atoms = bulk("Cu", "fcc", a=3.6).repeat(2)
    atoms.calc = MagneticCalculator(EMT(), random_module(spin_orbit=True))
    plain = atoms.copy()
    plain.calc = EMT()
    with pytest.warns(UserWarning, match="initial magnetic moments are all 0.*the base model's energy"):
        energy = atoms.get_potential_energy()
    assert energy == pytest.approx(plain.get_potential_energy(), abs=1e-12)
