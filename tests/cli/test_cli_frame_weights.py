"""MACE's per-frame weights in ``sparsekern finetune``: ``config_weight``, the weights of
``--config_type_weights`` and ``config_<label>_weight`` read as MACE reads them; the E0
fits and the magnetic fit weigh frames as the loss does; what weighs 0 is left out of the
errors; bad weights are refused in one line before any slow work. (The loss itself
against MACE's: test_cli_loss.py; the graphed step's: test_graphed_step_families.py; the
magnetic fit's rows: magnetism/test_fit.py.)"""

import json

import numpy as np
import pytest
from sparsekern.cli import main


def _weighted_file(files, tmp_path, name, **info):
    """train.xyz with ``info`` (key: one value per frame, None: left out) in each frame."""
    from ase.io import read, write

    frames = read(files / "train.xyz", ":")
    for i, atoms in enumerate(frames):
        atoms.info.update({k: v[i] for k, v in info.items() if v[i] is not None})
    write(tmp_path / name, frames)
    return tmp_path / name


def _run(files, out, train, *extra):
    return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(train), "--test",
                 str(files / "test.xyz"), "--method", "sparse", "--epochs", "1", "--out", str(out), "--no_progress",
                 *extra])


def test_weights_are_read_as_mace_reads_them(files, tmp_path):
    from sparsekern.finetune.data import read_frames

    path = _weighted_file(files, tmp_path, "w.xyz", config_weight=[2.0, None, 0.5],
                          config_type=["slab", "slab", None], config_forces_weight=[None, 0.0, 4.0],
                          config_virials_weight=[3.0, None, None], config_magmom_weight=[None, None, 2.0],
                          REF_virials=[np.ones(9), None, None], REF_stress=[None, np.ones(6), None])
    frames = read_frames(path, stress_key="REF_stress", virials_key="REF_virials", by_type={"slab": 10.0})
    assert [f.weights for f in frames] == [
        {"energy": 20.0, "forces": 20.0, "stress": 60.0, "magforces": 20.0, "magmom": 20.0},  # stress as virials
        {"energy": 10.0, "forces": 0.0, "stress": 10.0, "magforces": 10.0, "magmom": 10.0},
        {"energy": 0.5, "forces": 2.0, "stress": 0.5, "magforces": 0.5}]  # (magmom: 1, not stored)
    assert all(not f.weights for f in read_frames(files / "train.xyz"))  # (1 everywhere: nothing stored)


@pytest.mark.parametrize("info, flags, says", [
    ({"config_energy_weight": -1.0}, (), "frame 1: config_energy_weight=-1.0: a weight must be a finite number >= 0"),
    ({"config_weight": "heavy"}, (), "frame 1: config_weight='heavy': a weight must be a finite number >= 0"),
    ({"config_weight": float("nan")}, (), "frame 1: config_weight=nan: a weight must be"),
    ({"config_dipole_weight": 2.0}, (), "frame 1: config_dipole_weight=2.0: weighs no label sparsekern trains"),
    ({}, ("--config_type_weights", "[1, 2]"), "--config_type_weights: expected a dict of config_type -> weight"),
    ({}, ("--config_type_weights", "{'Default': -1}"), "--config_type_weights: expected a dict"),
    ({"config_type": "slab"}, ("--config_type_weights", "{'slba': 2.0}"),
     "--config_type_weights: no frame has config_type 'slba' (the frames' config_types: 'Default', 'slab')"),
    ({}, ("--config_type_weights", "{[1]: 2.0}"), "--config_type_weights: expected a dict"),
    # every frame weighing 0: a loss of 0 would save the base as the fine-tuned model
    ({}, ("--config_type_weights", "{'Default': 0}"), "every training frame weighs 0 in the loss"),
])
def test_bad_weights_are_refused_in_one_line(files, tmp_path, capsys, info, flags, says):
    train = _weighted_file(files, tmp_path, "bad.xyz", **{k: [None, v, None] for k, v in info.items()})
    assert _run(files, tmp_path / "out", train, *flags) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_weighted_run_records_its_weights_and_resumes_under_them(files, tmp_path, capsys):
    """Frame weights from the file and a --config_type_weights from a --config file: the
    run records the types' weights; MACE's default dict weighs nothing (the same run);
    other weights are other arguments."""
    train = _weighted_file(files, tmp_path, "w.xyz", config_type=["slab", None, None],
                           config_energy_weight=[None, 0.0, None])
    (tmp_path / "run.yaml").write_text("config_type_weights: {slab: 5.0}\n")
    out = tmp_path / "out"
    assert _run(files, out, train, "--config", str(tmp_path / "run.yaml")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["config_type_weights"] == "{'slab': 5.0}"
    assert _run(files, out, train, "--config_type_weights", "{'slab': 5.0, 'Default': 1.0}", "--epochs", "2") == 0
    capsys.readouterr()
    assert _run(files, out, train, "--config_type_weights", "{'slab': 2.0}") == 2
    assert "config_type_weights: checkpoint \"{'slab': 5.0}\" vs now \"{'slab': 2.0}\"" in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert _run(files, plain, files / "train.xyz", "--config_type_weights", '{"Default": 1.0}') == 0
    assert json.loads((plain / "metrics.json").read_text())["settings"]["config_type_weights"] is None


def test_the_errors_leave_out_what_weighs_0(files, tmp_path):
    """Validation frames whose energies weigh 0 (and are 50 eV off): the energy errors are
    the other frame's (MACE's metrics)."""
    from ase.io import read

    off = [a.info["REF_energy"] + 50.0 for a in read(files / "train.xyz", ":")]
    valid = _weighted_file(files, tmp_path, "v.xyz", config_energy_weight=[0.0, None, 0.0],
                           REF_energy=[off[0], None, off[2]])
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"), "--valid",
                 str(valid), "--method", "sparse", "--epochs", "0", "--out", str(out), "--no_progress",
                 "--E0s", "foundation"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(files / "tiny.model"), device="cpu", default_dtype="float64")
    errors = []
    for atoms in read(valid, ":"):
        label = atoms.info["REF_energy"]
        atoms.calc = calc
        errors.append(abs(atoms.get_potential_energy() - label) / len(atoms))
    assert m["valid_energy_mae_mev_per_atom"] == pytest.approx(1e3 * errors[1], rel=1e-6)
    assert 1e3 * np.mean(errors) > 2 * m["valid_energy_mae_mev_per_atom"]


def test_the_e0_fits_weigh_frames_as_the_loss_does():
    """A frame whose energy weighs 0 does not move --E0s estimated or average; one that
    weighs 4 counts as 4 copies of it."""
    from ase import Atoms

    from sparsekern.finetune.data import Frame, energy_shift

    def frame(symbols, energy, weight=None):
        atoms = Atoms(symbols)
        atoms.positions = 2.0 * np.arange(3 * len(atoms)).reshape(-1, 3)
        return Frame(atoms, energy, np.zeros((len(atoms), 3)), weights={} if weight is None else {"energy": weight})

    frames = [frame("AlCu", -7.0), frame("Al2Cu", -10.5), frame("AlCu3", -16.0), frame("Cu", 99.0, weight=0.0)]
    kept = frames[:3]
    for spec in ("estimated", "average"):
        def shift(fs):
            return energy_shift(spec, fs, [13, 29], lambda zs: {13: -3.0, 29: -4.0},
                                lambda: np.array([-3.0 * len(f.atoms) for f in fs]))
        assert shift(frames) == pytest.approx(shift(kept), abs=1e-12)
        heavy = kept + [frame("Al3Cu", -14.0, weight=4.0)]
        assert shift(heavy) == pytest.approx(shift(kept + [frame("Al3Cu", -14.0)] * 4), abs=1e-12)
        assert shift(heavy) != pytest.approx(shift(kept + [frame("Al3Cu", -14.0)]), abs=1e-6)



def test_a_label_that_weighs_0_everywhere_has_no_errors(files, tmp_path):
    """A test file whose energies all weigh 0: no energy errors in metrics.json (strict
    JSON: no NaN), the forces' as before, parity.png without the energy panel's points."""
    test = _weighted_file(files, tmp_path, "t.xyz", config_energy_weight=[0.0, 0.0, 0.0])
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"), "--test",
                 str(test), "--method", "sparse", "--epochs", "1", "--out", str(out), "--no_progress"]) == 0

    def strict(constant):
        raise AssertionError(f"{constant} in metrics.json")

    m = json.loads((out / "metrics.json").read_text(), parse_constant=strict)
    assert not [k for k in m if "energy_mae" in k or "energy_rmse" in k]
    assert m["test_force_mae_mev_per_A"] > 0 and m["zero_shot_test_force_mae_mev_per_A"] > 0
    assert (out / "parity.png").stat().st_size > 0


def test_e0s_average_needs_an_energy_of_weight_above_0_per_element(files, tmp_path, capsys):
    train = _weighted_file(files, tmp_path, "w.xyz", config_energy_weight=[0.0, 0.0, 0.0])
    assert _run(files, tmp_path / "out", train, "--E0s", "average") == 2
    err = capsys.readouterr().err
    assert "--E0s average: every training energy holding atomic numbers [13, 29] weighs 0" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert _run(files, tmp_path / "estimated", train, "--epochs", "0") == 0  # (estimated: the model's E0s kept)


def test_types_are_mace_s_isolated_atoms_and_numbers_included(files, tmp_path):
    """--config_type_weights may weigh MACE's IsolatedAtom frames (set aside, yet present)
    and name a config_type written as a number."""
    from ase import Atoms
    from ase.io import read, write

    frames = read(files / "train.xyz", ":")
    for atoms in frames:
        atoms.info["config_type"] = 1
    atom = Atoms("Al", cell=[10.0] * 3, info={"config_type": "IsolatedAtom", "REF_energy": -3.0})
    write(tmp_path / "i.xyz", [atom] + frames)
    assert _run(files, tmp_path / "out", tmp_path / "i.xyz", "--epochs", "0", "--config_type_weights",
                "{'IsolatedAtom': 0.0, 1: 2.0}") == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["settings"]["config_type_weights"] == "{'1': 2.0, 'IsolatedAtom': 0.0}"
    from sparsekern.finetune.data import read_frames, type_weights

    read = read_frames(tmp_path / "i.xyz", isolated={}, by_type=type_weights("{1: 2.0}"))
    assert [f.weights["energy"] for f in read] == [2.0] * len(frames)
