"""Magnetism through ``sparsekern finetune``: a tiny MACE model on rocksalt NiO cells
labelled by a known magnetic energy (a random E_mag: exchange, Landau terms) on top
of the model's own; the exact base at the start, training, metrics, the merged model
with its magnetic modules in the calculator, the adapter's refusals. And data the
module has not seen: fcc Ni cells with an O atom, EMT energies plus a nearest-neighbour
Heisenberg model (a Dzyaloshinskii-Moriya term with spin-orbit coupling), moments as
ASE writes them (collinear ``magmoms``, 3-vector ``initial_magmoms``), and every bad
input refused in one line before any work."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsekern.cli import main
from test_energy_symmetry import random_module

pytest.importorskip("mace")


def _truth():
    return random_module(seed=5, n_basis=4, scale=0.5)


def _frames(n, seed):
    from ase.build import bulk

    from sparsekern.magnetism.graph import collate, magnetic_graph

    truth, rng, frames = _truth(), np.random.default_rng(seed), []
    for k in range(n):
        atoms = bulk("NiO", "rocksalt", a=4.17, cubic=True)
        atoms.rattle(0.02, seed=seed * 100 + k)
        m = np.where(atoms.numbers[:, None] == 28, rng.normal(0, 1, (len(atoms), 3)), 0.0)
        e, f, h = (t.detach().numpy() for t in truth.energy_and_forces(collate([magnetic_graph(atoms, 3.5, m)], "cpu")))
        atoms.info["REF_energy"] = float(e[0]) - 10.0 * len(atoms)
        atoms.arrays.update(REF_forces=f, REF_magmom=m, REF_magforces=h)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from ase.io import write
    from e3nn import o3

    from sparsekern.integrations.mace.models import mace_mp0_shaped

    root = tmp_path_factory.mktemp("magnetic")
    model = mace_mp0_shaped("small", seed=1, num_elements=2, atomic_numbers=[8, 28], max_ell=2, correlation=2,
                            hidden_irreps=o3.Irreps("8x0e+8x1o"), r_max=3.5, radial_MLP=[8, 8], num_bessel=4,
                            atomic_energies=[-3.0, -4.0])
    torch.save(model, root / "tiny.model")
    write(root / "train.xyz", _frames(6, 0))
    write(root / "test.xyz", _frames(2, 1))
    return root


def _args(files, out, *extra):
    return ["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"),
            "--test", str(files / "test.xyz"), "--method", "sparse", "--lr", "0.02", "--out", str(out),
            "--no_progress", "--batch_size", "2", *extra]


def _run(files, out, *extra):
    return main(_args(files, out, *extra))


def test_two_processes_fit_and_train_as_one(files, tmp_path):
    """``--nproc 2`` gives one process's magnetic run: the closed-form fit's folds follow
    the frames' global index (counted per process, they differed: another ridge, and
    test errors 17 % apart)."""
    from safetensors.torch import load_file

    from helpers import run_python

    extra = ("--epochs", "1", "--magmom_key", "REF_magmom", "--magforces_key", "REF_magforces", "--predict_magmom")
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(files, one, *extra) == 0
    done = run_python("-m", "sparsekern", *_args(files, two, *extra), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["processes"] == 2 and m1["magnetic_fit"]["ridge"] == m2["magnetic_fit"]["ridge"] is not None
    for key in [k for k in m1 if k.startswith("test_")]:
        assert m2[key] == pytest.approx(m1[key], rel=1e-6), key  # (errors of ~0.03 meV: round-off shows)
    for name in ("adapter.safetensors", "adapter.magnetic.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        # (the fit's ridge solve is ill-conditioned: summed over two processes, its
        # output layers move by round-off times ~1e8, the deltas by ~1e-10 relative)
        assert a.keys() == b.keys(), name
        for k in a:  # (an empty tensor: a layer with no active entry)
            assert a[k].shape == b[k].shape and (b[k] - a[k]).abs().sum() <= 1e-6 * a[k].abs().sum(), k


def test_exact_base_at_initialisation(files):
    from ase.io import read

    from sparsekern.integrations import family_for
    from sparsekern.magnetism.family import MagneticFamily

    base_family = family_for(str(files / "tiny.model"))
    family = MagneticFamily(base_family)
    model = family.load(str(files / "tiny.model"), "cpu")
    atoms = read(files / "test.xyz", ":")
    for a in atoms:
        a.set_initial_magnetic_moments(a.arrays["REF_magmom"])
    out = family.outputs(model, family.collate([family.graph(model, a) for a in atoms], "cpu"), False)
    energy, forces = base_family.predict(model.base, base_family.collate(
        [base_family.graph(model.base, a) for a in atoms], "cpu"), False)
    assert torch.equal(out["energy"], energy) and torch.equal(out["forces"], forces)
    assert not out["magforces"].any()


def test_magnetic_finetune_metrics_and_merged_model(files, capsys):
    from ase.io import read
    from helpers import files_written

    from sparsekern.magnetism.calculator import load_calculator

    out = files / "run"
    assert _run(files, out, "--epochs", "3", "--magmom_key", "REF_magmom", "--magforces_key", "REF_magforces",
                "--predict_magmom") == 0
    m = json.loads((out / "metrics.json").read_text())
    # the summary names the merged model's magnetic modules too
    assert out / "merged.magnetic.safetensors" in map(Path, files_written(capsys.readouterr().err, out))
    test = read(files / "test.xyz", ":")
    untrained = 1e3 * np.mean([np.abs(a.arrays["REF_magforces"]).mean() for a in test])  # E_mag = 0's error
    # the labels' E_mag is within the module's reach: the closed-form fit finds it
    assert 0 <= m["test_magforce_mae_mev_per_muB"] < 0.05 * untrained
    assert m["test_magmom_mae_muB"] >= 0 and m["magnetic_params"] > 0
    fit = m["magnetic_fit"]  # what the cross-validation chose, and why: E_mag beat E_mag = 0 held out
    assert fit["ridge"] > 0 and fit["force_target"] in ("residual", "zero")
    assert fit["held_out_loss"] < fit["held_out_loss_without"]
    assert m["merged_model_check"]["max_abs_energy_diff_ev"] < 1e-4
    calc = load_calculator(m["merged_model"], "cpu")
    atoms = test[0].copy()
    atoms.set_initial_magnetic_moments(atoms.arrays["REF_magmom"])
    atoms.calc = calc
    assert atoms.get_magnetic_moments().shape == (len(atoms), 3)
    assert calc.get_property("magforces", atoms).shape == (len(atoms), 3)
    assert not np.allclose(calc.get_property("magforces", atoms), 0.0)  # trained: E_mag is no longer 0


def test_magnetic_modules_are_float64_beside_a_float32_base(files, tmp_path):
    """The closed-form fit's output layers hold large weights whose terms cancel: the
    magnetic modules train, are saved and load in float64 whatever the base's dtype, and
    E_mag's energy is consistent with its forces to float64 round-off."""
    from ase.io import read

    from safetensors import safe_open

    from sparsekern.magnetism.calculator import load_calculator
    from sparsekern.magnetism.graph import collate, magnetic_graph
    from sparsekern.magnetism.storage import sidecar

    out = tmp_path / "f32"
    assert _run(files, out, "--epochs", "1", "--magmom_key", "REF_magmom", "--magforces_key", "REF_magforces",
                "--default_dtype", "float32") == 0
    merged = json.loads((out / "metrics.json").read_text())["merged_model"]
    with safe_open(str(sidecar(Path(merged))), "pt") as f:  # as the run trained and saved them
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float64}
    calc = load_calculator(merged, "cpu")
    assert {p.dtype for p in calc.energy.parameters()} == {torch.float64}
    atoms = read(files / "test.xyz", "0")
    atoms.set_initial_magnetic_moments(atoms.arrays["REF_magmom"])

    def e_mag(shift):
        moved = atoms.copy()
        moved.positions[0, 0] += shift
        return calc.energy.outputs(collate([magnetic_graph(moved, calc.energy.cutoff)], "cpu"))

    h, force = 1e-4, e_mag(0.0)["forces"][0, 0].detach()
    assert e_mag(0.0)["energy"].abs().sum() > 0
    assert float((e_mag(h)["energy"] - e_mag(-h)["energy"]).detach().sum() / (2 * h) + force) == pytest.approx(0, abs=1e-6)


def test_magnetic_stresses_are_the_base_and_e_mag_and_train(files, tmp_path, capsys):
    """With stress labels, a magnetic model's stress is the base model's plus E_mag's
    (``MagneticEnergy.outputs``: its own test against the strain derivative); the run
    trains and reports them, and the merged model's calculator gives the run's stresses."""
    from ase.io import read, write
    from ase.stress import full_3x3_to_voigt_6_stress

    from sparsekern.integrations import family_for
    from sparsekern.magnetism.family import MagneticFamily
    from sparsekern.magnetism.graph import collate, magnetic_graph

    family = MagneticFamily(family_for(str(files / "tiny.model")))
    model = family.load(str(files / "tiny.model"), "cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # any trained state
        for p in model.energy.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    atoms = read(files / "test.xyz", ":")
    for a in atoms:
        a.set_initial_magnetic_moments(a.arrays["REF_magmom"])
    out = family.outputs(model, family.collate([family.graph(model, a) for a in atoms], "cpu"), False, stress=True)
    base = family.base.outputs(model.base, family.base.collate([family.base.graph(model.base, a) for a in atoms],
                                                                "cpu"), False, stress=True)["stress"]
    mag = model.energy.outputs(collate([magnetic_graph(a, model.energy.cutoff) for a in atoms], "cpu"),
                               stress=True)["stress"]
    assert float(mag.abs().max()) > 1e-4
    torch.testing.assert_close(out["stress"], base + mag, rtol=1e-12, atol=1e-15)

    paths = []
    for name in ("train.xyz", "test.xyz"):  # E_mag's stresses as the labels, as its energies are
        frames = read(files / name, ":")
        for a in frames:
            batch = collate([magnetic_graph(a, 3.5, a.arrays["REF_magmom"])], "cpu")
            a.info["REF_stress"] = full_3x3_to_voigt_6_stress(
                _truth().outputs(batch, stress=True)["stress"][0].detach().numpy())
        write(tmp_path / name, frames)
        paths.append(tmp_path / name)
    run = tmp_path / "run"
    capsys.readouterr()
    assert _run(files, run, "--train", str(paths[0]), "--test", str(paths[1]), "--epochs", "2", "--magmom_key",
                "REF_magmom", "--magforces_key", "REF_magforces", "--stress_weight", "100") == 0
    m = json.loads((run / "metrics.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    assert m["test_stress_mae_mev_per_A3"] > 0 and printed["test_stress_mae_mev_per_A3"] == m["test_stress_mae_mev_per_A3"]
    assert m["test_stress_mae_mev_per_A3"] < m["zero_shot_test_stress_mae_mev_per_A3"]
    # the calculator, E_mag's part included (float32 model: round-off of stresses of ~0.1 eV/Å^3)
    assert m["merged_model_check"]["max_abs_stress_diff_ev_per_A3"] <= 1e-6


def test_adapter_with_magnetic_modules_reproduces_the_run(files, capsys):
    """The run's adapter (the base's deltas) goes onto the base wrapped with the stored
    magnetic modules and reproduces the merged model; a plain base refuses it, so do
    other magnetic modules, and a base with magnetic modules refuses a plain run's adapter.
    ``sparsekern report --model`` checks it against the base with the modules written
    beside it (it refused: the command had no way to give them), and says so where they
    are missing."""
    from ase.io import read

    from sparsekern.finetune import adapter_calculator, disable_adapter
    from sparsekern.finetune.adapters import load_adapter
    from sparsekern.integrations import family_for
    from sparsekern.magnetism.calculator import load_calculator
    from sparsekern.magnetism.family import MagneticFamily, MagneticModel
    from sparsekern.magnetism.storage import load_magnetic

    out = files / "run"  # the run of test_magnetic_finetune_metrics_and_merged_model
    if not (out / "metrics.json").exists():
        assert _run(files, out, "--epochs", "3", "--magmom_key", "REF_magmom", "--magforces_key",
                    "REF_magforces", "--predict_magmom") == 0
    m = json.loads((out / "metrics.json").read_text())
    spec = str(files / "tiny.model")
    family = MagneticFamily(family_for(spec))
    with pytest.raises(ValueError, match="made for the base model with its magnetic modules, but this model is a "
                                         "plain base model"):
        load_adapter(family.base.load(spec, "cpu"), out / "adapter.safetensors")
    # report --model: the base with the magnetic modules beside the adapter, checked against it
    assert main(["report", str(out / "adapter.safetensors"), "--model", spec, "--out", str(files / "report")]) == 0
    checked = json.loads((files / "report" / "adapter.report.json").read_text())
    assert main(["report", str(out / "adapter.safetensors"), "--out", str(files / "report_alone")]) == 0
    alone = json.loads((files / "report_alone" / "adapter.report.json").read_text())
    assert checked["changed_params"] == alone["changed_params"] > 0 and checked["by_path"] == alone["by_path"]
    moved = files / "moved"
    moved.mkdir(exist_ok=True)
    (moved / "adapter.safetensors").write_bytes((out / "adapter.safetensors").read_bytes())
    capsys.readouterr()
    assert main(["report", str(moved / "adapter.safetensors"), "--model", spec, "--out", str(moved)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no magnetic modules at" in err
    plain = files / "plain"
    assert _run(files, plain, "--epochs", "1") == 0
    with pytest.raises(ValueError, match="made for a plain base model, but this model is the base model with its "
                                         "magnetic modules"):
        load_adapter(family.load(spec, "cpu"), plain / "adapter.safetensors")
    stored = next(out.glob("*.magnetic.safetensors"))
    other = MagneticModel(family.base.load(spec, "cpu"), *load_magnetic(stored, "cpu"))
    with torch.no_grad():
        other.energy.onsite[-1].bias.add_(1e-3)  # another run's modules
    with pytest.raises(ValueError, match="was made with other magnetic modules than this model's"):
        load_adapter(other, out / "adapter.safetensors")
    model = MagneticModel(family.base.load(spec, "cpu"), *load_magnetic(stored, "cpu"))
    load_adapter(model, out / "adapter.safetensors")
    atoms = read(files / "test.xyz", "0")
    atoms.set_initial_magnetic_moments(atoms.arrays["REF_magmom"])
    energy = family.outputs(model, family.collate([family.graph(model, atoms)], "cpu"), False)["energy"]
    assert any(abs(v) > 1e-3 for v in m["e0_shift_ev"].values())  # load_adapter applied it to the base
    atoms.calc = load_calculator(m["merged_model"], "cpu")
    assert abs(float(energy[0]) - atoms.get_potential_energy()) < 1e-4
    atoms.calc = adapter_calculator(model)  # the model itself, its magnetic modules beside the base's calculator
    assert abs(float(energy[0]) - atoms.get_potential_energy()) < 1e-10 and atoms.calc.get_property("magforces").any()
    with disable_adapter(model):  # the swap drops the base calculator's results too
        assert abs(float(energy[0]) - atoms.get_potential_energy()) > 1e-6


def test_an_element_resolved_run_writes_its_magnetic_modules_beside_the_adapter(files):
    """Element-resolved deltas leave no merged model: the adapter is the result, and the
    magnetic modules it was trained with are written beside it (they were lost), so that
    the base, those modules and the adapter give the run's test errors again."""
    from ase.io import read

    from sparsekern.finetune.adapters import load_adapter
    from sparsekern.integrations import family_for
    from sparsekern.magnetism.family import MagneticFamily, MagneticModel
    from sparsekern.magnetism.fit import zero_outputs
    from sparsekern.magnetism.storage import load_magnetic, sidecar

    out = files / "element_resolved"
    assert _run(files, out, "--epochs", "1", "--magmom_key", "REF_magmom", "--magforces_key", "REF_magforces",
                "--element_resolved") == 0
    m = json.loads((out / "metrics.json").read_text())
    beside = sidecar(out / "adapter.safetensors")
    assert m["merged_model"] is None and m["adapter_beside"] == [str(beside)] and str(beside) in m["files"]
    spec = str(files / "tiny.model")
    family = MagneticFamily(family_for(spec))
    model = load_adapter(MagneticModel(family.base.load(spec, "cpu"), *load_magnetic(beside, "cpu")),
                         out / "adapter.safetensors")
    def energy_mae():
        errors = []
        for atoms in read(files / "test.xyz", ":"):
            atoms.set_initial_magnetic_moments(atoms.arrays["REF_magmom"])
            energy = family.outputs(model, family.collate([family.graph(model, atoms)], "cpu"), False)["energy"]
            errors.append(abs(float(energy[0]) - atoms.info["REF_energy"]) / len(atoms))
        return 1e3 * np.mean(errors)

    assert energy_mae() == pytest.approx(m["test_energy_mae_mev_per_atom"], abs=1e-3)  # (float32 round-off)
    zero_outputs(model.energy)
    assert abs(energy_mae() - m["test_energy_mae_mev_per_atom"]) > 1.0  # without the fitted E_mag


def test_graphed_magnetic_run_is_the_eager_run(files, monkeypatch):
    """``--cuda_graphs`` with magnetic forces and a moment head (fake graphs on the CPU,
    strict: every NiO cell plans alike): the magnetic batch padded beside the base's, the
    loss's magnetic terms weighed by atom, the closed-form fit's new weights read by the
    replays; the run's adapter, magnetic modules and metrics are the eager run's."""
    from safetensors.torch import load_file

    from helpers import fake_cuda_graphs
    from sparsekern.finetune import graphed_step

    fake_cuda_graphs(monkeypatch, strict=True)
    replays = []
    replay = graphed_step._CapturedStep.__call__
    monkeypatch.setattr(graphed_step._CapturedStep, "__call__",
                        lambda self, inputs: replays.append(sorted(k for k in inputs if k.endswith("_labels")))
                        or replay(self, inputs))
    magnetic = ("--epochs", "2", "--magmom_key", "REF_magmom", "--magforces_key", "REF_magforces",
                "--predict_magmom", "--device", "cpu")
    eager, graphed = files / "eager", files / "graphed"
    assert _run(files, eager, *magnetic) == 0
    assert _run(files, graphed, *magnetic, "--cuda_graphs") == 0
    # 2 epochs of 3 batches: the first step eager (the density rises from 0), 5 replayed
    # with both magnetic terms; the zero-shot and final test evaluations replayed
    terms = ["graph_labels", "forces_labels", "magforces_labels", "magmom_labels"]
    assert replays == [[]] + [sorted(terms)] * 5 + [[]]
    # the density schedule counted all 6 steps in both runs: its hook sits on the base,
    # whose forward runs (on the wrapper it never ran: the deltas stayed at density 0)
    for run in (eager, graphed):
        model = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
        assert {v["steps"] for k, v in model.items() if k.endswith("_extra_state")} == {6}
    for name in ("adapter.safetensors", "merged.magnetic.safetensors"):
        got, want = load_file(graphed / name), load_file(eager / name)
        assert got.keys() == want.keys()
        assert all(torch.allclose(got[k], want[k], rtol=1e-12, atol=1e-15) for k in want), name
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (graphed, eager))
    keys = [k for k in want if k.startswith("test_")] + ["magnetic_params"]
    assert {"test_magforce_mae_mev_per_muB", "test_magmom_mae_muB"} <= set(keys)
    assert [got[k] for k in keys] == pytest.approx([want[k] for k in keys], rel=1e-12)
    assert [h["train_loss"] for h in got["history"]] == pytest.approx([h["train_loss"] for h in want["history"]],
                                                                      rel=1e-12)


def _nickel_labels(atoms, moments, spin_orbit):
    """Energy, forces and magnetic forces of a model independent of sparsekern's: EMT
    plus E = sum_(i<j) J(r) m_i.m_j [+ D_ij.(m_i x m_j)] + sum_i -0.05 |m|^2 + 0.05 |m|^4,
    J = 0.1 (3 Å - r)^2 eV/μB^2 within 3 Å (the first shell), D_ij = (J / 2) r^_ij x (u_i + u_j)
    (axial: moments are), u_i = sum_(O atoms k) 4 (3 Å - r_ik)^2 r^_ik / Å^2 within 3 Å."""
    from ase.calculators.emt import EMT
    from ase.neighborlist import neighbor_list

    i, j, shift = neighbor_list("ijS", atoms, 3.0)
    pos = torch.tensor(atoms.positions, requires_grad=True)
    m = torch.tensor(moments, dtype=torch.float64).reshape(len(atoms), -1)
    m = (m * torch.tensor([0.0, 0.0, 1.0]) if m.shape[1] == 1 else m).requires_grad_(True)
    vec = pos[j] - pos[i] + torch.tensor(shift @ atoms.cell.array)
    r = vec.norm(dim=1)
    coupling = 0.1 * (3.0 - r).square()
    pair = coupling * (m[i] * m[j]).sum(1)
    if spin_orbit:
        unit = vec / r[:, None]
        oxygen = torch.as_tensor(atoms.numbers[j] == 8, dtype=torch.float64)
        u = torch.zeros(len(atoms), 3, dtype=torch.float64).index_add(0, torch.as_tensor(i),
                                                                      (4 * oxygen * (3.0 - r).square())[:, None] * unit)
        dm = torch.linalg.cross(unit, u[i] + u[j])
        pair = pair + 0.5 * coupling * (dm * torch.linalg.cross(m[i], m[j])).sum(1)
    m2 = m.square().sum(1)
    energy = 0.5 * pair.sum() + (-0.05 * m2 + 0.05 * m2.square()).sum()
    d_pos, d_m = torch.autograd.grad(energy, (pos, m))
    plain = atoms.copy()
    plain.calc = EMT()
    return (plain.get_potential_energy() + float(energy.detach()), plain.get_forces() - d_pos.numpy(), -d_m.numpy())


def _nickel_frames(n, seed, collinear):
    """Rattled fcc Ni (8 atoms, one of them O, m = 0) with random moments and magnetic
    forces under ``mag_forces``. Collinear: signed scalars under ``magmoms`` (ASE's reader
    moves that column into a calculator's results) beside the collinear
    ``initial_magmoms`` that ase.build gives Ni; else 3-vectors as ASE's ``initial_magmoms``."""
    from ase.build import bulk

    rng, frames = np.random.default_rng(seed), []
    for k in range(n):
        atoms = bulk("Ni", "fcc", a=3.52, cubic=True).repeat((2, 1, 1))
        atoms.numbers[0] = 8
        atoms.rattle(0.03, seed=seed * 100 + k)
        size = np.where(atoms.numbers == 28, rng.uniform(0.3, 0.8, len(atoms)), 0.0)
        if collinear:
            m = size * rng.choice([-1.0, 1.0], len(atoms))
        else:
            direction = rng.normal(0, 1, (len(atoms), 3))
            m = size[:, None] * direction / np.linalg.norm(direction, axis=1, keepdims=True)
        energy, forces, magforces = _nickel_labels(atoms, m, spin_orbit=not collinear)
        atoms.info["REF_energy"] = energy
        atoms.arrays["REF_forces"] = forces
        if collinear:
            atoms.arrays.update(magmoms=m, mag_forces=magforces[:, 2])
        else:
            del atoms.arrays["initial_magmoms"]
            atoms.set_initial_magnetic_moments(m)
            atoms.arrays["mag_forces"] = magforces
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def nickel(files):
    from ase.io import write

    for collinear, name in ((True, "collinear"), (False, "vector")):
        write(files / f"ni_{name}_train.xyz", _nickel_frames(8, 2, collinear))
        write(files / f"ni_{name}_test.xyz", _nickel_frames(3, 3, collinear))
    return files


def _run_nickel(files, name, out, *extra):
    return _run(files, out, "--train", str(files / f"ni_{name}_train.xyz"), "--test",
                str(files / f"ni_{name}_test.xyz"), "--epochs", "1", *extra)


def _strict_json(path):
    """metrics.json as JSON proper: NaN or Infinity refused."""
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, not valid JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def _rotated_energy(calc, atoms, moments, rotation=None):
    atoms = atoms.copy()
    atoms.arrays.pop("initial_magmoms", None)  # (collinear: 3-vectors would not fit)
    atoms.set_initial_magnetic_moments(moments if rotation is None else moments @ rotation.T)
    atoms.calc = calc
    return atoms.get_potential_energy()


def test_unseen_collinear_data_through_the_command_line(nickel):
    """Collinear moments under ASE's ``magmoms``, a moment head, no magnetic-force labels:
    the moment error and no magnetic-force error; without spin-orbit coupling the merged
    model's energy ignores a rotation of all moments."""
    from ase.io import read
    from scipy.spatial.transform import Rotation

    from sparsekern.magnetism.calculator import load_calculator

    out = nickel / "ni_collinear"
    assert _run_nickel(nickel, "collinear", out, "--magmom_key", "magmoms", "--predict_magmom") == 0
    m = _strict_json(out / "metrics.json")
    assert np.isfinite(m["test_energy_mae_mev_per_atom"]) and 0 <= m["test_magmom_mae_muB"] < 1.0
    assert "test_magforce_mae_mev_per_muB" not in m and m["magnetic_params"] > 0
    atoms = read(nickel / "ni_collinear_test.xyz", "0")
    moments = np.outer(atoms.calc.results["magmoms"], [0.0, 0.0, 1.0])
    calc = load_calculator(m["merged_model"], "cpu")
    turn = Rotation.random(random_state=4).as_matrix()
    e, e_turned = _rotated_energy(calc, atoms, moments), _rotated_energy(calc, atoms, moments, turn)
    assert e != _rotated_energy(calc, atoms, 0 * moments)  # the moments matter ...
    assert abs(e_turned - e) < 1e-9  # ... their common direction does not


def test_collinear_magnetic_forces_count_once_per_atom(nickel, monkeypatch):
    """Collinear magnetic forces (one scalar per atom, -dE/dm along the moments) are
    errors of one component per atom: the reported error is the merged model's, along
    the moments' axis (the other components, 0 without spin-orbit coupling, are not
    counted as labels of 0, which made it a third of that), and ``--cuda_graphs``
    weighs them as the eager loss does."""
    from ase.io import read

    from helpers import fake_cuda_graphs
    from sparsekern.magnetism.calculator import load_calculator

    flags = ("--magmom_key", "magmoms", "--magforces_key", "mag_forces", "--predict_magmom", "--forces_weight", "1",
             "--device", "cpu")
    eager, graphed = nickel / "ni_collinear_magforces", nickel / "ni_collinear_magforces_graphed"
    assert _run_nickel(nickel, "collinear", eager, *flags) == 0
    fake_cuda_graphs(monkeypatch)  # (not strict: rattled cells differ in their edges' plans)
    assert _run_nickel(nickel, "collinear", graphed, *flags, "--cuda_graphs") == 0
    m = _strict_json(eager / "metrics.json")
    calc, errors, moment_errors = load_calculator(m["merged_model"], "cpu"), [], []
    for atoms in read(nickel / "ni_collinear_test.xyz", ":"):
        label, moments = atoms.arrays["mag_forces"], atoms.calc.results["magmoms"]
        atoms.arrays.pop("initial_magmoms")  # (collinear: 3-vectors would not fit)
        atoms.set_initial_magnetic_moments(np.outer(moments, [0.0, 0.0, 1.0]))
        atoms.calc = calc
        predicted = calc.get_property("magforces", atoms)
        assert np.abs(predicted[:, :2]).max() < 1e-12
        errors.append(np.abs(predicted[:, 2] - label))
        collinear = atoms.copy()  # the same moments as scalars: the same numbers, as scalars
        collinear.arrays.pop("initial_magmoms")
        collinear.set_initial_magnetic_moments(moments)
        collinear.calc = calc
        assert np.array_equal(calc.get_property("magforces", collinear), predicted[:, 2])
        assert np.array_equal(calc.get_property("magmoms", collinear), calc.get_property("magmoms", atoms)[:, 2])
        # the moments' error is the calculator's too, over the atoms it gives a moment (O's is 0)
        magnetic = moments != 0
        predicted_moments = calc.get_property("magmoms", atoms)
        assert not predicted_moments[~magnetic].any() and (~magnetic).any()
        moment_errors.append(np.abs(np.linalg.norm(predicted_moments[magnetic], axis=1) - np.abs(moments[magnetic])))
    assert m["test_magforce_mae_mev_per_muB"] == pytest.approx(1e3 * np.concatenate(errors).mean(), rel=1e-6)
    assert m["test_magmom_mae_muB"] == pytest.approx(np.concatenate(moment_errors).mean(), rel=1e-6)
    got = _strict_json(graphed / "metrics.json")
    keys = [k for k in m if k.startswith("test_")]
    assert [got[k] for k in keys] == pytest.approx([m[k] for k in keys], rel=1e-12)
    assert [h["train_loss"] for h in got["history"]] == pytest.approx([h["train_loss"] for h in m["history"]],
                                                                      rel=1e-12)


def test_unseen_noncollinear_data_with_spin_orbit(nickel, capsys):
    """3-vector ``initial_magmoms`` and magnetic forces of a model with a
    Dzyaloshinskii-Moriya term: ``--spin_orbit`` fits the magnetic forces well below the
    error of E_mag = 0 and the energies below the model's before fine-tuning, and the
    merged model's energy turns with the moments' common direction. Force weight 1: the
    tiny base's force errors (about 240 meV/Å, not magnetic) would otherwise decide the
    fit of E_mag, which matches the base's force residuals (benchmarks/NOTES.md). A
    checkpoint of a run with the polar Dzyaloshinskii-Moriya term is refused in one line."""
    from ase.io import read
    from scipy.spatial.transform import Rotation

    from sparsekern.magnetism.calculator import load_calculator

    out = nickel / "ni_vector"
    assert _run_nickel(nickel, "vector", out, "--magmom_key", "initial_magmoms", "--magforces_key", "mag_forces",
                       "--predict_magmom", "--spin_orbit", "--forces_weight", "1") == 0
    m = _strict_json(out / "metrics.json")
    test = read(nickel / "ni_vector_test.xyz", ":")
    untrained = 1e3 * np.mean([np.abs(a.arrays["mag_forces"]).mean() for a in test])
    assert 0 <= m["test_magforce_mae_mev_per_muB"] < 0.5 * untrained
    assert m["test_energy_mae_mev_per_atom"] < 0.5 * m["zero_shot_test_energy_mae_mev_per_atom"]
    assert 0 <= m["test_magmom_mae_muB"] < 1.0 and m["settings"]["spin_orbit"]
    calc = load_calculator(m["merged_model"], "cpu")
    assert calc.energy.spin_orbit
    moments = test[0].get_initial_magnetic_moments()
    turn = Rotation.random(random_state=4).as_matrix()
    assert abs(_rotated_energy(calc, test[0], moments, turn) - _rotated_energy(calc, test[0], moments)) > 1e-6
    collinear = test[0].copy()  # (scalars: no axis for its spin-orbit terms)
    collinear.arrays.pop("initial_magmoms")
    collinear.set_initial_magnetic_moments(moments[:, 2])
    collinear.calc = calc
    with pytest.raises(ValueError, match="initial moments are collinear scalars, but --spin_orbit"):
        collinear.get_potential_energy()
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    del ck["identity"]["spin_orbit_dm"]  # as an older version wrote it
    torch.save(ck, out / "checkpoint.pt")
    capsys.readouterr()
    assert _run_nickel(nickel, "vector", out, "--magmom_key", "initial_magmoms", "--magforces_key", "mag_forces",
                       "--predict_magmom", "--spin_orbit", "--forces_weight", "1", "--epochs", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "spin_orbit_dm: checkpoint None vs now 'axial'" in err
    assert "started by an older version" in err


def _bad(frames, case):
    """``frames`` (collinear nickel, as read) broken as ``case`` says, moments under ``m``
    and magnetic forces under ``h`` (and the ``magmoms`` they had)."""
    broken = []
    for k, a in enumerate(frames):
        m, a = a.calc.results["magmoms"], a.copy()  # (a copy has no calculator)
        a.arrays.update(magmoms=m, m=m.copy(), h=np.outer(m, [0.1, 0.2, 0.3]))
        if case == "some frames" and k == 2:
            del a.arrays["m"]
        elif case == "nan":
            a.arrays["m"][3] = np.nan
        elif case == "moment bound":
            a.arrays["m"][2] = 1e20
        elif case == "magforce bound":
            a.arrays["h"][1, 2] = -1e30
        elif case == "moment shape":
            a.arrays["m"] = np.outer(m, [1.0, 1.0])
        elif case == "magforce shape":
            a.arrays["h"] = a.arrays["h"][:, :2].copy()
        elif case == "collinear magforces":
            a.arrays["m"], a.arrays["h"] = np.outer(m, [0.0, 0.6, 0.8]), 0.1 * m
        elif case == "all zero":
            a.arrays["m"] = np.zeros_like(m)
        broken.append(a)
    return broken


BAD = [  # (case, flags, what the one-line error says)
    ("missing key", ["--magmom_key", "MAGMOM"],
     "frame 0: no moments under key 'MAGMOM' (use --magmom_key to name it; array keys: ['REF_forces', 'h', "
     "'initial_magmoms', 'm', 'mag_forces', 'numbers', 'positions'], calculator results: ['magmoms'])"),
    ("moment shape", ["--magmom_key", "m"], "moments 'm' have shape (8, 2), expected (8,) (collinear) or (8, 3)"),
    ("some frames", ["--magmom_key", "m"], "frame 2: no moments under key 'm'"),
    ("nan", ["--magmom_key", "m"], "frame 0: moments 'm' hold NaN or infinity"),
    ("moment bound", ["--magmom_key", "m"], "frame 0: moments 'm' beyond physical bounds: 1e+20 μB"),
    ("magforce bound", ["--magmom_key", "m", "--magforces_key", "h"],
     "frame 0: magnetic forces 'h' beyond physical bounds: 1e+30 eV/μB"),
    ("magforce shape", ["--magmom_key", "m", "--magforces_key", "h"],
     "magnetic forces 'h' have shape (8, 2), expected (8,) (collinear) or (8, 3)"),
    ("collinear magforces", ["--magmom_key", "m", "--magforces_key", "h"],
     "magnetic forces 'h' are collinear scalars but moments 'm' are 3-vectors"),
    ("no moments", ["--predict_magmom"], "need --magmom_key"),
    ("ascent", ["--magmom_key", "m", "--predict_magmom", "--magnetic_lr", "-1"], "--magnetic_lr must be > 0, got -1"),
    ("no moments", ["--spin_orbit"], "need --magmom_key"),
    ("collinear moments", ["--magmom_key", "m", "--spin_orbit"],
     "frame 0: moments 'm' are collinear scalars, but --spin_orbit's terms couple the moments' directions"),
    ("no moments", ["--magforces_key", "h"], "need --magmom_key"),
    ("all zero", ["--magmom_key", "m", "--predict_magmom"],
     "--magmom_key 'm': every training frame's moments are 0, where the magnetic energy and its derivatives vanish"),
]


@pytest.mark.parametrize("case,flags,message", BAD)
def test_bad_magnetic_input_is_refused_in_one_line_before_any_work(nickel, tmp_path, capsys, case, flags, message):
    from ase.io import read, write

    write(tmp_path / "train.xyz", _bad(read(nickel / "ni_collinear_train.xyz", ":"), case))
    out = tmp_path / "out"
    assert _run(nickel, out, "--train", str(tmp_path / "train.xyz"), "--test", str(tmp_path / "train.xyz"),
                "--epochs", "1", *flags) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("sparsekern finetune: error: ") and message in err, err
    assert not out.exists()  # refused before the output folder (or anything in it)


def test_labels_that_weigh_0_change_nothing(files, tmp_path):
    """A training frame at config_weight 0: its labels, true or 50 eV and 100 times off,
    leave the run as it was (the E0 fit, the magnetic energy's fit, the loss)."""
    from ase.io import read, write

    runs = []
    for off in (False, True):
        frames = read(files / "train.xyz", ":")
        frames[1].info["config_weight"] = 0.0
        if off:
            frames[1].info["REF_energy"] += 50.0
            for key in ("REF_forces", "REF_magforces"):
                frames[1].arrays[key] *= 100.0
        write(tmp_path / f"train_{off}.xyz", frames)
        out = tmp_path / f"run_{off}"
        assert _run(files, out, "--train", str(tmp_path / f"train_{off}.xyz"), "--epochs", "1", "--magmom_key",
                    "REF_magmom", "--magforces_key", "REF_magforces", "--predict_magmom") == 0
        runs.append(json.loads((out / "metrics.json").read_text()))
    tested = [k for k in runs[0] if k.startswith("test_")]
    assert len(tested) >= 6 and [runs[0][k] for k in tested] == [runs[1][k] for k in tested]
    assert runs[0]["magnetic_fit"] == runs[1]["magnetic_fit"]
