"""Magnetism through ``sparsekern finetune``: a tiny MACE model on rocksalt NiO cells
labelled by a known magnetic energy (a random E_mag: exchange, Landau terms) on top
of the model's own; the exact base at the start, training, metrics, the merged model
with its magnetic modules in the calculator, and the refusals."""

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
        atoms.arrays.update(REF_forces=f, REF_magmom=m, REF_magforces=h, PAIRS=h[:, :2].copy())
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


def _run(files, out, *extra):
    return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"),
                 "--test", str(files / "test.xyz"), "--method", "sparse", "--lr", "0.02", "--out", str(out),
                 "--no_progress", "--batch_size", "2", *extra])


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
    assert m["merged_model_check"]["max_abs_energy_diff_ev"] < 1e-4
    calc = load_calculator(m["merged_model"], "cpu")
    atoms = test[0].copy()
    atoms.set_initial_magnetic_moments(atoms.arrays["REF_magmom"])
    atoms.calc = calc
    assert atoms.get_magnetic_moments().shape == (len(atoms), 3)
    assert calc.get_property("magforces", atoms).shape == (len(atoms), 3)
    assert not np.allclose(calc.get_property("magforces", atoms), 0.0)  # trained: E_mag is no longer 0


def test_refusals(files, capsys):
    assert _run(files, files / "bad1", "--epochs", "0", "--magmom_key", "MAGMOM") == 2
    err = capsys.readouterr().err
    assert "no moments under key 'MAGMOM'" in err and "REF_magmom" in err
    assert _run(files, files / "bad2", "--epochs", "0", "--magforces_key", "REF_magforces") == 2
    assert "need --magmom_key" in capsys.readouterr().err
    assert _run(files, files / "bad3", "--epochs", "0", "--magmom_key", "REF_magmom", "--magforces_key",
                "PAIRS") == 2
    assert "magnetic forces 'PAIRS' have shape (8, 2), expected (8,) (collinear) or (8, 3)" in capsys.readouterr().err


def test_adapter_with_magnetic_modules_reproduces_the_run(files):
    """The run's adapter (the base's deltas) goes onto the base wrapped with the stored
    magnetic modules and reproduces the merged model; a plain base refuses it."""
    from ase.io import read

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
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(family.base.load(spec, "cpu"), out / "adapter.safetensors")
    model = MagneticModel(family.base.load(spec, "cpu"), *load_magnetic(next(out.glob("*.magnetic.safetensors")),
                                                                        "cpu"))
    load_adapter(model, out / "adapter.safetensors")
    atoms = read(files / "test.xyz", "0")
    atoms.set_initial_magnetic_moments(atoms.arrays["REF_magmom"])
    energy = family.outputs(model, family.collate([family.graph(model, atoms)], "cpu"), False)["energy"]
    assert any(abs(v) > 1e-3 for v in m["e0_shift_ev"].values())  # load_adapter applied it to the base
    atoms.calc = load_calculator(m["merged_model"], "cpu")
    assert abs(float(energy[0]) - atoms.get_potential_energy()) < 1e-4
