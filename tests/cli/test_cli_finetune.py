"""``sparsekern finetune`` end to end: a tiny MACE model on EMT-labelled frames (sparse
and full), metrics, only deltas trainable, the merged model in MACE's calculator, the
adapter into a fresh base, resume, refusals; and SevenNet-0 on real silicon frames."""

import json

import numpy as np
import pytest
import torch

import sparsekern
from sparsekern.cli import main
from sparsekern.locations import data_dir

KEYS = ("test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A", "zero_shot_test_energy_mae_mev_per_atom",
        "zero_shot_test_force_mae_mev_per_A", "changed_fraction", "trainable_params", "wall_s", "peak_rss_mb")


def _run(files, out, *extra, method="sparse", epochs=2):
    return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"),
                 "--test", str(files / "test.xyz"), "--method", method, "--epochs", str(epochs), "--lr", "0.02",
                 "--out", str(out), "--no_progress", *extra])


@pytest.fixture(scope="module")
def sparse_run(files):
    out = files / "sparse"
    assert _run(files, out) == 0
    return out, json.loads((out / "metrics.json").read_text())


def _calc_energy(path, atoms):
    from mace.calculators import MACECalculator

    atoms = atoms.copy()
    atoms.calc = MACECalculator(model_paths=str(path), device="cpu")
    return atoms.get_potential_energy(), atoms.get_forces()


def test_sparse_metrics_adapter_and_merged_model(files, sparse_run):
    from ase.io import read

    out, m = sparse_run
    assert all(np.isfinite(m[k]) and m[k] >= 0 for k in KEYS)
    assert abs(m["changed_fraction"] - 0.03) <= 0.1 * 0.03
    assert m["epochs"] == 2 and [h["epoch"] for h in m["history"]] == [1, 2]
    # only the deltas train: exactly the parameters prepare() makes trainable
    fresh = sparsekern.prepare(torch.load(files / "tiny.model", weights_only=False),
                               sparsekern.SparseConfig(density=0.03))
    trainable = {n: p.numel() for n, p in fresh.named_parameters() if p.requires_grad}
    assert all(".deltas." in n for n in trainable) and m["trainable_params"] == sum(trainable.values())
    assert set(m["e0_shift_ev"]) == {"13", "29"}

    test = read(files / "test.xyz", 0)
    e_base, _ = _calc_energy(files / "tiny.model", test)
    e_merged, f_merged = _calc_energy(out / "merged.model", test)
    # float64 throughout: the graphs too (MACE builds them in the default dtype, float32 here)
    assert m["merged_model_check"]["max_abs_energy_diff_ev"] <= 1e-10
    assert m["merged_model_check"]["max_abs_force_diff_ev_per_A"] <= 1e-10
    shift = sum(m["e0_shift_ev"][str(z)] for z in test.numbers)
    assert abs(e_merged - e_base - shift) > 1e-4  # training moved the energy (beyond the E0 shift)

    # the adapter into a fresh base (which applies the E0 shift it carries) is the merged model
    from sparsekern.integrations.mace.models import mace_batch

    base = torch.load(files / "tiny.model", weights_only=False)
    sparsekern.load_adapter(base, out / "adapter.safetensors")
    pred = base(mace_batch(base, [test]), compute_force=True)
    assert abs(float(pred["energy"].detach()) - e_merged) <= 1e-10
    assert np.abs(pred["forces"].detach().numpy() - f_merged).max() <= 1e-10


def test_energy_zero_refitted_after_training(files, sparse_run):
    """--E0s estimated follows the trained model: the merged model's training energy
    residuals have no component along the composition (least squares), and the adapter
    carries the shift; --E0s foundation keeps the model's own reference."""
    from ase.io import read
    from safetensors import safe_open

    out, m = sparse_run
    assert set(m["e0_refit_ev"]) == {"13", "29"}
    frames = read(files / "train.xyz", ":")
    residuals = [a.info["REF_energy"] - _calc_energy(out / "merged.model", a)[0] for a in frames]
    composition = np.array([[np.sum(a.numbers == z) for z in (13, 29)] for a in frames], dtype=float)
    assert np.abs(composition.T @ np.array(residuals)).max() <= 1e-6 * np.abs(composition).sum()
    with safe_open(str(out / "adapter.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["e0_shift_ev"]) == m["e0_shift_ev"]
    kept = files / "foundation"
    assert _run(files, kept, "--E0s", "foundation", epochs=1) == 0
    km = json.loads((kept / "metrics.json").read_text())
    assert km["e0_refit_ev"] == {} and set(km["e0_shift_ev"].values()) == {0.0}


def test_resume_matches_an_uninterrupted_run(files, sparse_run, capsys):
    from helpers import files_written

    out = files / "resumed"
    assert _run(files, out, epochs=1) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1
    capsys.readouterr()
    assert _run(files, out, epochs=2) == 0  # resumes from epoch 1
    m = json.loads((out / "metrics.json").read_text())
    # the summary names every file in the folder: metrics, checkpoint, learning curves, parity plot, adapter,
    # merged model
    assert files_written(capsys.readouterr().err, out) == m["files"] and len(m["files"]) == 6
    for picture in ("training.png", "parity.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    for k in ("test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A", "changed_fraction"):
        assert m[k] == sparse_run[1][k]
    # another lr (a default changed since the run began) is refused, saying how to resume
    assert _run(files, out, "--lr", "0.05", epochs=3) == 2
    err = capsys.readouterr().err
    assert "pass --lr 0.02" in err and len(err.strip().splitlines()) == 1


def test_stdout_is_the_metrics_json_alone(files, tmp_path):
    """In a new process (MACE prints a line when imported), stdout parses as JSON."""
    import subprocess
    import sys

    out = tmp_path / "fresh"
    run = subprocess.run([sys.executable, "-m", "sparsekern", "finetune", "--model", str(files / "tiny.model"),
                          "--train", str(files / "train.xyz"), "--method", "sparse", "--epochs", "0",
                          "--out", str(out), "--no_progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    printed, m = json.loads(run.stdout), json.loads((out / "metrics.json").read_text())
    assert printed and all(m[k] == v for k, v in printed.items())


def test_zero_epochs_evaluates_the_base_model(files, capsys):
    """--epochs 0 in a new folder: the test errors are the zero-shot ones, and no
    checkpoint or learning curves are written (nothing was trained)."""
    from helpers import files_written

    out = files / "zero"
    capsys.readouterr()
    assert _run(files, out, epochs=0) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["history"] == [] and m["changed_params"] == 0
    for k in ("energy_mae_mev_per_atom", "force_mae_mev_per_A"):
        assert m[f"test_{k}"] == pytest.approx(m[f"zero_shot_test_{k}"], rel=1e-9)
    listed = files_written(capsys.readouterr().err, out)
    assert not any(name in p for p in listed for name in ("training.png", "checkpoint.pt")), listed


def test_a_folder_of_another_runs_results_is_refused(files, tmp_path, capsys):
    """A fresh run (no checkpoint) where another command's results are is refused in one
    line, the files left as they are; the same command again (its checkpoint deleted)
    rewrites them, and names only the files it wrote (no learning curves after --epochs 0:
    the earlier run's are gone)."""
    from helpers import files_written

    out = tmp_path / "stale"
    assert _run(files, out, epochs=1) == 0
    (out / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _run(files, out, method="full", epochs=0) == 2
    err = capsys.readouterr().err
    assert (f"output folder {out} holds another run's results (adapter.safetensors, merged.model, metrics.json, "
            f"parity.png, training.png; written for different arguments: method: metrics.json 'sparse' vs now 'full') "
            f"and no checkpoint to resume from: use another --out or delete them to start over") in err, err
    assert len(err.strip().splitlines()) == 1 and {p.name: p.read_bytes() for p in out.iterdir()} == before
    metrics = json.loads((out / "metrics.json").read_text())
    del metrics["identity"]  # (as an older sparsekern wrote it)
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert _run(files, out, epochs=0) == 2
    assert "holds another run's results (adapter.safetensors, " in capsys.readouterr().err
    (out / "metrics.json").unlink()
    assert _run(files, out, epochs=0) == 2 and "; arguments unknown) and no checkpoint" in capsys.readouterr().err
    for name in ("adapter.safetensors", "merged.model", "parity.png", "training.png"):  # (as it says)
        (out / name).unlink()
    assert _run(files, out, epochs=1) == 0
    (out / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert _run(files, out, epochs=0) == 0  # the same command (the epochs continue a run): its files rewritten
    listed = files_written(capsys.readouterr().err, out)
    assert json.loads((out / "metrics.json").read_text())["files"] == listed and len(listed) == 4


@pytest.mark.parametrize("n, fraction, seed", [(3, 0.34, 0), (10, 0.1, 1), (57, 0.2, 123), (5, 0.01, 7)])
def test_valid_fraction_holds_out_the_frames_mace_does(n, fraction, seed, tmp_path):
    random_train_valid_split = pytest.importorskip("mace.data.utils").random_train_valid_split

    from sparsekern.finetune.data import valid_indices

    _, theirs = random_train_valid_split(list(range(n)), fraction, seed, str(tmp_path))
    assert valid_indices(n, fraction, seed) == theirs and theirs


def test_valid_fraction_and_validation_as_the_test_sees_it(files, capsys):
    """--valid_fraction trains on the rest and lists what it held out; test frames that
    are training frames are named; each epoch's validation errors carry the energy
    reference the model would be saved with, so on the test's frames the last epoch's
    are the test errors (without the refit they carry the deltas' drift)."""
    from sparsekern.finetune.data import valid_indices

    out = files / "valid_fraction"
    capsys.readouterr()
    assert _run(files, out, "--valid_fraction", "0.34", "--test", str(files / "train.xyz"), epochs=1) == 0
    m = json.loads((out / "metrics.json").read_text())
    held = valid_indices(3, 0.34, 0)
    assert (m["n_train"], m["n_valid"], m["n_test"]) == (2, 1, 3) and m["valid_indices_in_train"] == held
    assert m["test_frames_in_train"] == 2 and m["valid_frames_in_train"] == 0 and len(m["history"][0]["valid"]) == 4
    assert "warning: 2 of 3 test frames are training frames too" in capsys.readouterr().err

    out = files / "valid_is_test"
    assert _run(files, out, "--valid", str(files / "test.xyz"), epochs=1) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["e0_refit_ev"] and m["test_frames_in_train"] == 0
    for k in ("energy_mae_mev_per_atom", "force_mae_mev_per_A"):
        assert m["history"][-1]["valid"][k] == pytest.approx(m[f"test_{k}"], rel=1e-9)
    assert "frames are training frames too" not in capsys.readouterr().err

    for bad, said in ((("--valid_fraction", "1"), "--valid_fraction must be in (0, 1), got 1.0"),
                      (("--valid_fraction", "0.5", "--valid", str(files / "test.xyz")),
                       "--valid_fraction holds out training frames: leave out --valid and --max_valid"),
                      (("--valid_fraction", "0.5", "--max_train", "1"),
                       "--valid_fraction needs at least 2 training frames, got 1")):
        assert _run(files, files / "refused", *bad) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1
    assert not (files / "refused").exists()


def test_without_a_test_set_the_errors_are_the_validation_or_training_frames(files, capsys):
    """--test is optional, as MACE's: the final errors, the parity plot and the merged
    model's check are then the validation frames', else the training frames', and the
    command says so."""
    from helpers import files_written

    def run(out, *extra):
        return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"),
                     "--method", "sparse", "--epochs", "1", "--lr", "0.02", "--out", str(out), "--no_progress",
                     *extra])

    for name, extra, n, said in (("valid", ("--valid", str(files / "test.xyz")), 1, "validation frames'"),
                                 ("train", (), 3, "training frames' own (not held out)")):
        out = files / f"no_test_{name}"
        capsys.readouterr()
        assert run(out, *extra) == 0
        m = json.loads((out / "metrics.json").read_text())
        printed, err = capsys.readouterr()
        assert (m["evaluated_on"], m["n_test"], m[f"n_{name}"]) == (name, 0, n)
        error_keys = [k for k in m if k.endswith(("_mev_per_atom", "_mev_per_A"))]
        assert len(error_keys) == 12 and all(k.startswith((f"{name}_", f"zero_shot_{name}_",
                                                           f"zero_shot_no_e0_shift_{name}_")) for k in error_keys)
        for k in ("energy_mae_mev_per_atom", "force_mae_mev_per_A"):
            assert json.loads(printed)[f"{name}_{k}"] == m[f"{name}_{k}"] > 0
            assert m[f"zero_shot_{name}_{k}"] > 0
            if name == "valid":  # the selected epoch's validation, as the history has it
                assert m[f"valid_{k}"] == pytest.approx(m["history"][-1]["valid"][k], rel=1e-9)
        assert f"warning: no --test: the errors are the {said}" in err
        assert str(out / "parity.png") in files_written(err, out)
        check = m["merged_model_check"]
        assert check["frames"] == 1 and check["max_abs_force_diff_ev_per_A"] <= 1e-8

    for bad, said in ((("--max_test", "1"), "--max_test limits --test's frames: give --test"),
                      (("--max_valid", "1"), "--max_valid limits --valid's frames: give --valid")):
        assert run(files / "refused", *bad) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (files / "refused").exists()


def test_stress_loss_is_maces_on_the_labelled_frames(files, tmp_path):
    """--stress_weight adds stress_weight * mean((S - S_ref)^2) over the frames with a
    label, S from MACE's own model (its compute_stress); unlabelled frames add nothing."""
    from types import SimpleNamespace

    from helpers import with_stresses
    from sparsekern.finetune import evaluation
    from sparsekern.finetune.data import read_frames
    from sparsekern.integrations.base import family_for

    train, _ = with_stresses(files, tmp_path, unlabelled=(1,))
    frames = read_frames(train, stress_key="REF_stress")
    assert [f.stress is None for f in frames] == [False, True, False]
    family = family_for(str(files / "tiny.model"))
    model = family.load(str(files / "tiny.model"), "cpu")
    samples = evaluation.make_samples(family, model, frames, {})

    def loss(stress_weight):
        settings = SimpleNamespace(device="cpu", energy_weight=1.0, forces_weight=100.0, stress_weight=stress_weight,
                                   magforces_weight=0.0, magmom_weight=0.0, loss="weighted")
        return float(evaluation.loss(family, model, samples, settings))

    batch = family.collate([s.graph for s in samples], "cpu")
    stress = family.outputs(model, batch, False, stress=True)["stress"].detach()  # unpatched: MACE's own
    labelled = [0, 2]
    want = ((stress[labelled] - torch.stack([samples[i].stress for i in labelled])) ** 2).mean()
    assert want > 0
    sparsekern.patch(model)
    assert loss(1000.0) - loss(0.0) == pytest.approx(1000.0 * float(want), rel=1e-9)


def test_stress_training_reports_stress_errors(files, sparse_run, tmp_path, capsys):
    from helpers import with_stresses

    train, test = with_stresses(files, tmp_path)
    out = tmp_path / "stress"
    capsys.readouterr()
    assert _run(files, out, "--train", str(train), "--test", str(test), "--stress_weight", "100", epochs=1) == 0
    m = json.loads((out / "metrics.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    for key in ("test_stress_mae_mev_per_A3", "zero_shot_test_stress_mae_mev_per_A3"):
        assert m[key] > 0 and printed[key] == m[key]
    assert m["merged_model_check"]["max_abs_stress_diff_ev_per_A3"] <= 1e-8  # MACE's calculator, float64
    assert not any("stress" in k for k in sparse_run[1])  # no stress keys without --stress_weight

    no_cell = tmp_path / "molecule.xyz"
    from ase.io import read, write

    frames = read(train, ":")
    frames[0].pbc = False
    write(no_cell, frames)
    for bad, said in ((("--stress_weight", "1", "--stress_key", "PK"), "no training frame has a stress under 'PK'"),
                      (("--stress_weight", "-1"), "loss weights must be finite and >= 0, got --stress_weight -1"),
                      (("--stress_weight", "1", "--train", str(no_cell)),
                       "stress 'REF_stress' on a frame that is not periodic in 3 directions"),
                      (("--stress_key", "REF_stress"), "--stress_key names the stress labels --stress_weight trains")):
        args = ("--train", str(train), "--test", str(test)) if "--train" not in bad else ("--test", str(test))
        assert _run(files, tmp_path / "refused", *args, *bad) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()


def test_fast_phase_trains_only_the_active_entries_and_resumes(files):
    out = files / "fast"
    assert _run(files, out, "--fast_after", "1", epochs=2) == 0  # epoch 2 in fast mode
    assert _run(files, out, "--fast_after", "1", epochs=3) == 0  # resumes a fast-mode checkpoint
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 3 and m["trainable_params"] == m["changed_params"]
    assert 0 < m["changed_fraction"] <= 1.1 * 0.03


def test_the_fast_phase_keeps_the_trained_values_active_entries(tmp_path):
    """Whether or not the moving average was validated before the switch to the fast phase,
    the entries kept are the trained values' active ones (the average's thresholds were
    left in place, and more entries kept)."""
    pytest.importorskip("mace")
    from helpers import write_tiny_mace_case

    files = write_tiny_mace_case(tmp_path, n_train=6)
    kept = []
    for name, extra in (("average", ()), ("last", ("--no_ema",))):
        assert _run(files, tmp_path / name, "--fast_after", "2", "--valid_fraction", "0.34", "--batch_size", "2",
                    *extra, epochs=4) == 0
        kept.append(json.loads((tmp_path / name / "metrics.json").read_text())["changed_params"])
    assert kept[0] == kept[1]


def test_ema_saves_the_average_and_resumes(files, capsys):
    """The moving average is on by default: the merged model holds the average of the
    trained weights (full fine-tuning: every parameter), not the last step's (--no_ema);
    a stopped run resumes to the same result; the sparse average differs from the last
    step's and keeps the target density."""
    out = files / "ema_full"
    assert _run(files, out, method="full", epochs=2) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    average = ck["average"]
    assert average["updates"] == 2  # 3 frames, batch 4: one step per epoch
    merged = torch.load(out / "merged.model", weights_only=False)
    params = list(merged.parameters())
    assert len(params) == len(average["shadow"])
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, average["shadow"]))
    last = files / "no_ema_full"  # the same training without the average: its last step
    assert _run(files, last, "--no_ema", method="full", epochs=2) == 0
    assert "average" not in torch.load(last / "checkpoint.pt", weights_only=False)
    trained = list(torch.load(last / "merged.model", weights_only=False).parameters())
    assert any(not torch.equal(t.detach(), s) for t, s in zip(trained, average["shadow"]))
    capsys.readouterr()  # a run without the average (as before it was the default) resumes with --no_ema
    assert _run(files, last, method="full", epochs=3) == 2
    err = capsys.readouterr().err
    assert "resumes with --no_ema" in err and len(err.strip().splitlines()) == 1

    sparse = files / "ema_sparse"  # (sparse_run is resumed by another test)
    assert _run(files, sparse, epochs=2) == 0
    resumed = files / "ema_sparse_resumed"
    assert _run(files, resumed, "--ema", epochs=1) == 0 and _run(files, resumed, epochs=2) == 0
    last = files / "no_ema_sparse"
    assert _run(files, last, "--no_ema", epochs=2) == 0
    m, r, n = (json.loads((d / "metrics.json").read_text()) for d in (sparse, resumed, last))
    for k in ("test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A", "changed_fraction"):
        assert m[k] == r[k]
    assert m["test_force_mae_mev_per_A"] != n["test_force_mae_mev_per_A"]
    assert abs(m["changed_fraction"] - 0.03) <= 0.1 * 0.03  # the average, on the target density


def test_full_fine_tuning(files):
    out = files / "full"
    assert _run(files, out, method="full", epochs=1) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["trainable_params"] == m["model_params"] and m["changed_fraction"] > 0.9
    assert m["test_force_mae_mev_per_A"] != m["zero_shot_test_force_mae_mev_per_A"]
    assert m["merged_model_check"]["max_abs_energy_diff_ev"] <= 1e-10
    assert not (out / "adapter.safetensors").exists()


def test_bad_inputs_are_refused_clearly(files, sparse_run, capsys, tmp_path):
    assert _run(files, tmp_path / "a", "--train", str(tmp_path / "missing.xyz")) == 2
    assert "data file not found" in capsys.readouterr().err
    assert _run(files, tmp_path / "b", "--energy_key", "DFT_energy") == 2
    assert "no energy under key 'DFT_energy'" in capsys.readouterr().err
    assert _run(files, tmp_path / "c", "--E0s", "{13: -3.0}") == 2
    assert "no energy given for atomic numbers [29]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(files, tmp_path / "d", method="dense")
    err = capsys.readouterr().err
    assert "invalid choice: 'dense'" in err and len(err.strip().splitlines()) == 1  # no usage dump first
    with pytest.raises(SystemExit):
        _run(files, tmp_path / "e", "--lr_schedule", "linear")
    err = capsys.readouterr().err
    assert "--lr_schedule: invalid choice: 'linear'" in err and len(err.strip().splitlines()) == 1
    assert _run(files, tmp_path / "f", "--ema", "--ema_decay", "1.5") == 2
    assert "--ema_decay must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert _run(files, tmp_path / "g", "--modal", "PBE") == 2
    assert "--modal/--head PBE: the model has one fidelity; leave it out" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "defg")
    out, _ = sparse_run  # a checkpoint for other arguments
    assert _run(files, out, "--density", "0.05") == 2
    assert "written for different arguments (density: checkpoint 0.03 vs now 0.05)" in capsys.readouterr().err


def _write_broken(files, tmp_path, name, broken):
    from ase.io import read, write

    frames = read(files / "train.xyz", ":")
    broken(frames[1])
    write(tmp_path / name, frames)
    return tmp_path / name


def test_bad_data_and_folders_are_refused_before_slow_work(files, sparse_run, capsys, tmp_path):
    """One line each, exit code 2, and no output folder made for bad data."""
    from sparsekern.files import exclusive

    def refused(out, *extra, says):
        assert _run(files, out, *extra) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err

    nan = _write_broken(files, tmp_path, "nan.xyz", lambda a: a.info.update(REF_energy=float("nan")))
    refused(tmp_path / "n", "--train", str(nan), says="frame 1: energy 'REF_energy' hold NaN or infinity")
    inf = _write_broken(files, tmp_path, "inf.xyz", lambda a: a.arrays["REF_forces"].__setitem__((0, 0), np.inf))
    refused(tmp_path / "i", "--train", str(inf), says="forces 'REF_forces' hold NaN or infinity")
    overlap = _write_broken(files, tmp_path, "overlap.xyz", lambda a: a.positions.__setitem__(1, a.positions[0] + 0.1))
    refused(tmp_path / "o", "--train", str(overlap), says="overlapping atoms")
    text = _write_broken(files, tmp_path, "text.xyz", lambda a: a.info.update(REF_energy="abc"))
    refused(tmp_path / "t", "--train", str(text), says="frame 1: energy 'REF_energy' is not a number: 'abc'")
    empty = _write_broken(files, tmp_path, "empty.xyz", lambda a: a.__delitem__(slice(None)))
    refused(tmp_path / "e", "--train", str(empty), says="frame 1: no atoms")
    (tmp_path / "e0s.json").write_text('{"Al": -3.0}')
    refused(tmp_path / "j", "--E0s", str(tmp_path / "e0s.json"), says="expected atomic numbers -> energies (eV), got "
                                                                      "{'Al': -3.0}")
    (tmp_path / "e0s.json").write_text("{13: -3.0}")
    refused(tmp_path / "j", "--E0s", str(tmp_path / "e0s.json"), says="e0s.json: not JSON (Expecting property name")
    refused(tmp_path / "j", "--E0s", "{13: 1e999, 29: -4.0}", says="energies must be finite numbers")
    flat = _write_broken(files, tmp_path, "flat.xyz", lambda a: a.cell.__setitem__(2, [0.0, 0.0, 0.0]))
    refused(tmp_path / "f", "--train", str(flat), says="frame 1: periodic (pbc [True, True, True]) with a degenerate")
    stress = _write_broken(files, tmp_path, "stress.xyz", lambda a: a.info.update(REF_stress="abc"))
    refused(tmp_path / "r", "--train", str(stress), "--stress_weight", "1", says="frame 1: stress 'REF_stress' is not "
                                                                                  "numbers: 'abc'")
    # the only stress label held out by --valid_fraction (its frame 1 of 3 at seed 0): refused, not trained without
    one = _write_broken(files, tmp_path, "one.xyz", lambda a: a.info.update(REF_stress=np.zeros(6)))
    refused(tmp_path / "v", "--train", str(one), "--stress_weight", "1", "--valid_fraction", "0.34",
            says="(--valid_fraction held out those that have one)")
    assert not any((tmp_path / name).exists() for name in "niotejcfrv")
    (tmp_path / "file").write_text("")
    refused(tmp_path / "file", says="is a file")
    (tmp_path / "ck").mkdir()
    torch.save({"weights": 1}, tmp_path / "ck" / "checkpoint.pt")
    refused(tmp_path / "ck", says="is not a sparsekern checkpoint; delete it or use another --out")
    (tmp_path / "lock" / ".lock").mkdir(parents=True)
    refused(tmp_path / "lock", says=".lock is not a file (sparsekern's lock): remove it")
    (tmp_path / "late" / "metrics.json").mkdir(parents=True)  # found only when the results are written
    refused(tmp_path / "late", says="metrics.json: it is a folder")
    refused(tmp_path / "d", "--density", "0", says="--density must be in (0, 1]")
    refused(tmp_path / "w", "--energy_weight", "-1", says="loss weights must be finite and >= 0, got --energy_weight -1")
    refused(tmp_path / "s", "--density_warmup", "1", "--density_anneal", "5", says="must end within --epochs")
    refused(tmp_path / "p", "--density_peak", "0.01", says="--density_peak must be in [--density, 1]")
    refused(tmp_path / "nan", "--lr", "nan", "--density_warmup", "inf", says="numbers must be finite, got --density_warmup "
                                                                            "inf, --lr nan")
    if not torch.cuda.is_available():
        refused(tmp_path / "g", "--device", "cuda", says="sees no CUDA device")
    refused(tmp_path / "seed", "--seed", str(2 ** 70), says="--seed must be in [0, 2**63)")
    # found once the model is loaded: a density that keeps none of its path weights trained nothing
    refused(tmp_path / "tiny", "--density", "1e-9", says="density 1e-09 keeps none of the model's")
    out, _ = sparse_run
    with exclusive(out):  # another run holds the folder
        refused(out, says="is in use by another run")


@pytest.mark.parametrize("extra, says", [
    (["--density", "0"], "--density must be in (0, 1], got 0.0"),  # (not the default lr's "math domain error")
    (["--density", "-1"], "--density must be in (0, 1], got -1.0"),
    (["--energy_weight", "0", "--forces_weight", "0"], "every loss weight is 0 (--energy_weight 0, --forces_weight 0"),
    (["--stage_two", "--stage_two_energy_weight", "0", "--stage_two_forces_weight", "0", "--epochs", "2"],
     "every loss weight is 0 (--stage_two_energy_weight 0, --stage_two_forces_weight 0"),
])
def test_settings_are_refused_before_anything_loads(tmp_path, capsys, extra, says):
    """Without --lr (the default lr takes the density's log), before the model or data are read."""
    assert main(["finetune", "--model", str(tmp_path / "absent.model"), "--train", str(tmp_path / "absent.xyz"),
                 "--method", "sparse", "--out", str(tmp_path / "out"), "--no_progress", *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_labels_beyond_physical_bounds_are_refused_at_read_time(files, capsys, tmp_path):
    """Finite but absurd labels would diverge the loss after the slow work: refused at
    read time naming the file, the frame and the label; a folder is not "not found"."""
    def big(kind):
        def broken(a):
            if kind == "energy":
                a.info["REF_energy"] = 1e30
            elif kind == "forces":
                a.arrays["REF_forces"][0, 1] = -1e30
            else:
                a.info["REF_stress"] = np.array([1e40, 0, 0, 0, 0, 0])
        return broken

    cases = (("energy", [], "energy 'REF_energy' beyond physical bounds: 2.5e+29 eV per atom"),
             ("forces", [], "forces 'REF_forces' beyond physical bounds: 1e+30 eV/Å"),
             ("stress", ["--stress_weight", "1"], "stress 'REF_stress' beyond physical bounds: 1e+40"))
    for kind, extra, says in cases:
        path = _write_broken(files, tmp_path, f"{kind}.xyz", big(kind))
        assert _run(files, tmp_path / kind, "--train", str(path), *extra) == 2
        err = capsys.readouterr().err
        assert f"{path} frame 1: {says}" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / kind).exists()
    (tmp_path / "folder").mkdir()
    assert _run(files, tmp_path / "f", "--train", str(tmp_path / "folder")) == 2
    assert f"data file {tmp_path / 'folder'} is a folder" in capsys.readouterr().err


def test_a_frame_without_a_label_the_others_have_is_named(files, capsys, tmp_path):
    """Not "use --forces_key": the key is right for the other frames."""
    path = _write_broken(files, tmp_path, "no_forces.xyz", lambda a: a.arrays.pop("REF_forces"))
    assert _run(files, tmp_path / "out", "--train", str(path)) == 2
    err = capsys.readouterr().err
    assert (f"{path} frame 1: no forces under key 'REF_forces', which other frames have" in err
            and len(err.strip().splitlines()) == 1), err


def test_all_electron_energies_are_within_the_bounds(files, tmp_path):
    """Total energies with core electrons: a heavy element's is ~1e5-1e6 eV per atom (Te
    about -1.8e5), not a broken label."""
    from sparsekern.finetune.data import read_frames

    def all_electron(a):
        a.info["REF_energy"] -= 1.8e5 * len(a)

    path = _write_broken(files, tmp_path, "all_electron.xyz", all_electron)
    assert read_frames(path)[1].energy < -1e5 * len(read_frames(path)[1].atoms)


def test_any_property_ase_moved_into_its_calculator_is_read(files, tmp_path):
    """ASE moves ``free_energy=`` (as it does ``energy=``) into the frame's calculator."""
    from ase.io import read, write

    from sparsekern.finetune.data import read_frames

    frames = read(files / "train.xyz", ":")
    for a in frames:
        a.info["free_energy"] = a.info.pop("REF_energy") - 1.0
    write(tmp_path / "free.xyz", frames)
    assert "free_energy" not in read(tmp_path / "free.xyz").info  # (where ASE put it)
    read_back = read_frames(tmp_path / "free.xyz", energy_key="free_energy")
    assert [f.energy for f in read_back] == [a.info["free_energy"] for a in frames]


def test_an_edited_training_file_is_not_resumed(files, capsys, tmp_path):
    """The data's content is in the checkpoint's identity: a rerun on an edited file is
    refused in one line naming it (it resumed, silently training on other data)."""
    from ase.io import read, write

    train = tmp_path / "train.xyz"
    train.write_bytes((files / "train.xyz").read_bytes())
    out = tmp_path / "out"
    assert _run(files, out, "--train", str(train), epochs=1) == 0
    frames = read(train, ":")
    frames[0].info["REF_energy"] += 0.01
    write(train, frames)
    capsys.readouterr()
    assert _run(files, out, "--train", str(train), epochs=2) == 2
    err = capsys.readouterr().err
    assert f"(train: the file {train} changed since (content sha256" in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_resumes_under_its_own_options_only(files, capsys, tmp_path):
    """An option the identity leaves out where it is off (Stage Two, --valid_fraction, a
    cosine schedule, the moving average) differs where the checkpoint has it on: such a
    checkpoint is not resumed by a command without it (it was, training the held-out
    frames)."""
    from sparsekern.finetune.settings import Settings

    base = dict(model=str(files / "tiny.model"), train=str(files / "train.xyz"), test=None, method="sparse", out="o",
                lr=0.1)
    on = Settings(**base, valid_fraction=0.34, stage_two=True, lr_schedule="cosine", epochs=4).identity()
    assert Settings(**base, valid_fraction=0.34, stage_two=True, lr_schedule="cosine", epochs=4).differences(on) == {}
    differ = Settings(**base, epochs=5).differences(on)
    assert differ["valid_fraction"] == (0.34, None) and differ["stage_two"] == (True, False)
    assert differ["lr_schedule"] == ("cosine", "constant") and differ["epochs"] == (4, 5)
    assert Settings(**base, ema=False).differences(Settings(**base).identity()) == {"ema": (True, False)}
    assert Settings(**base).differences(Settings(**base, ema=False).identity()) == {"ema": (None, True),
                                                                                    "ema_decay": (None, 0.99)}
    out = tmp_path / "held_out"
    assert _run(files, out, "--valid_fraction", "0.34", epochs=1) == 0
    capsys.readouterr()
    assert _run(files, out, epochs=2) == 2
    err = capsys.readouterr().err
    assert "written for different arguments (valid_fraction: checkpoint 0.34 vs now None)" in err, err


def test_options_the_run_does_not_read_are_refused(files, capsys, tmp_path):
    """An option that another method, mode or magnetism reads would change nothing: a
    value other than its default is refused in one line, all such options named; its
    default passes (it is what the run does anyway)."""
    cases = [("full", ["--density", "0.05"], "--density applies to --method sparse only: leave it out"),
             ("lora", ["--mode", "block", "--fast_after", "1"], "--mode applies to --method sparse only; "
              "--fast_after applies to --method sparse --mode str or block only: leave them out"),
             ("sparse", ["--mode", "saliency", "--fast_after", "1"],
              "--fast_after applies to --method sparse --mode str or block only"),
             ("sparse", ["--lora_rank", "8"], "--lora_rank applies to --method lora only"),
             ("sparse", ["--tile", "4"], "--tile applies to --method sparse --mode block only"),
             ("sparse", ["--mode", "saliency", "--density_warmup", "1"],
              "--density_warmup applies to --method sparse --mode str or block only"),
             ("sparse", ["--no_ema", "--ema_decay", "0.9"], "--ema_decay applies to --ema only"),
             ("sparse", ["--magforces_weight", "10"], "--magforces_weight applies to --magforces_key only"),
             ("sparse", ["--magmom_weight", "2", "--magnetic_lr", "0.1"], "--magmom_weight applies to "
              "--predict_magmom only; --magnetic_lr applies to --predict_magmom only: leave them out")]
    for i, (method, extra, says) in enumerate(cases):
        assert _run(files, tmp_path / str(i), *extra, method=method) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / str(i)).exists()
    from sparsekern.finetune.settings import Settings

    settings = Settings(model="m", train="t", test=None, method="full", out="o", density=0.03, lora_rank=4)
    assert (settings.density, settings.lora_rank) == (0.03, 4)


def test_a_run_that_fails_at_the_model_leaves_no_trace(files, capsys, tmp_path, monkeypatch):
    """Refusals found once the model is loaded (an element it does not know; a foundation
    model name that cannot be downloaded): one line, and the output folder the run made is
    gone again; a folder that was there stays, without the run's lock file."""
    nickel = _write_broken(files, tmp_path, "ni.xyz", lambda a: a.numbers.__setitem__(0, 28))
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "made", tmp_path / "kept"):
        assert _run(files, out, "--train", str(nickel)) == 2
        err = capsys.readouterr().err
        assert "holds elements the model does not know: ['Ni']" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "made").exists() and list((tmp_path / "kept").iterdir()) == []

    import mace.calculators

    def offline(**kwargs):
        raise RuntimeError("Model download failed and no local model found")

    monkeypatch.setattr(mace.calculators, "mace_mp", offline)
    assert main(["finetune", "--foundation_model", "medium", "--train", str(files / "train.xyz"), "--method", "sparse",
                 "--out", str(tmp_path / "medium"), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "MACE foundation model 'medium': Model download failed" in err and "without internet, give a .model" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "medium").exists()


def test_model_files_that_are_not_models_are_refused_before_slow_work(files, capsys, tmp_path):
    """A text file, a truncated model and a pickle of no known family: one line, exit 2,
    no output folder; a model file's family is read from its content, not its suffix."""
    from sparsekern.integrations import family_for

    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "cut.model").write_bytes((files / "tiny.model").read_bytes()[:20000])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "weights.pth")
    for name, says in (("notes.txt", "is not a model file"), ("cut.model", "is not a model file"),
                       ("weights.pth", "holds no model of a known family"), ("absent.pth", "absent.pth: file not found"),
                       ("absent.model", "absent.model: file not found")):
        assert _run(files, tmp_path / f"out_{name}", "--model", str(tmp_path / name)) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / f"out_{name}").exists()
    (tmp_path / "mace.pth").write_bytes((files / "tiny.model").read_bytes())
    torch.save({"config": {}, "model_state_dict": {}}, tmp_path / "sevennet.model")
    assert family_for(str(tmp_path / "mace.pth")).name == "mace"
    assert family_for(str(tmp_path / "sevennet.model")).name == "sevennet"


def test_a_model_of_a_family_not_installed_is_refused_before_slow_work(files, capsys, tmp_path):
    """The project's environments hold one family each (Makefile): a SevenNet checkpoint
    in MACE's is refused at once, naming the package it needs."""
    import importlib.util

    if importlib.util.find_spec("sevenn") is not None:
        pytest.skip("needs an environment without sevenn (the Makefile's .venv-mace)")
    torch.save({"config": {}, "model_state_dict": {}}, tmp_path / "sevennet.pth")
    assert _run(files, tmp_path / "out", "--model", str(tmp_path / "sevennet.pth")) == 2
    err = capsys.readouterr().err
    assert "is a sevennet model, but sevenn is not installed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_divergence_and_interrupts_end_cleanly(files, capsys, tmp_path, monkeypatch):
    from sparsekern.finetune import trainer

    assert _run(files, tmp_path / "late_nan", epochs=1) == 0
    capsys.readouterr()
    monkeypatch.setattr(trainer, "loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    assert _run(files, tmp_path / "nan", epochs=1) == 2
    err = capsys.readouterr().err  # (no checkpoint was written before: none is said to be kept)
    assert "training diverged (try a lower --lr)" in err and "checkpoint" not in err, err
    assert _run(files, tmp_path / "late_nan", epochs=2) == 2
    assert "training diverged (try a lower --lr; the last checkpoint is kept)" in capsys.readouterr().err

    class OutOfMemory(torch.autograd.Function):  # what the CPU allocator raises in a backward
        forward = staticmethod(lambda ctx, x: x.clone())

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 81920000000 bytes.")

    def oom_loss(family, model, *a):  # on the way to the trained tensors, where the backward goes
        return OutOfMemory.apply(sum(p.sum() for p in model.parameters() if p.requires_grad))

    monkeypatch.setattr(trainer, "loss", oom_loss)
    assert _run(files, tmp_path / "oom", epochs=1) == 2
    err = capsys.readouterr().err
    assert "a training batch of 3 frame(s), 12 atoms (the largest 4), does not fit in memory" in err, err
    assert "--batch_size" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    from sparsekern.integrations.base import family_for

    def oom_outputs(*a, **k):  # an evaluation batch: its own option makes it smaller
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(type(family_for(str(files / "tiny.model"))), "outputs", oom_outputs)
    assert _run(files, tmp_path / "oom_eval", "--valid_batch_size", "2", epochs=0) == 2
    err = capsys.readouterr().err
    assert "an evaluation batch of 2 frame(s)" in err and "use a smaller --valid_batch_size" in err, err

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run", interrupted)
    assert _run(files, tmp_path / "stop") == 130
    err = capsys.readouterr().err  # (before any checkpoint: nothing to resume from)
    assert "interrupted; no checkpoint was written yet: a rerun starts over" in err and "Traceback" not in err
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "checkpoint.pt").write_bytes(b"")
    assert _run(files, tmp_path / "stopped") == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun the same command to resume from the last checkpoint in" in err, err


def test_sevennet0_sparse_on_silicon(tmp_path):
    pytest.importorskip("sevenn")
    from ase.io import read, write

    si = data_dir() / "si_mlearn" / "Si_train.xyz"
    if not si.exists():
        pytest.skip(f"real data missing: {si}")
    small = sorted(read(si, index=":"), key=len)[:2]  # the smallest cells keep it fast on CPU
    write(tmp_path / "train.xyz", small[:1])
    write(tmp_path / "test.xyz", small[1:])
    out = tmp_path / "out"
    assert main(["finetune", "--model", "7net-0", "--train", str(tmp_path / "train.xyz"), "--test",
                 str(tmp_path / "test.xyz"), "--method", "sparse", "--epochs", "1", "--out", str(out),
                 "--no_progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert abs(m["changed_fraction"] - 0.03) <= 0.1 * 0.03
    assert m["merged_model_check"]["max_abs_energy_diff_ev"] <= 1e-4  # float32, ~ -300 eV totals
    assert m["merged_model_check"]["max_abs_force_diff_ev_per_A"] <= 1e-4
    assert (out / "adapter.safetensors").stat().st_size < 0.2 * 4 * m["model_params"]


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """``make demo`` on the three smallest real silicon cells (the real demo: every 8th
    training frame, all 25 test frames, 4 epochs; minutes on a CPU)."""
    pytest.importorskip("sevenn")
    from ase.io import read, write

    from sparsekern import demo

    si = data_dir() / "si_mlearn" / "Si_train.xyz"
    if not si.exists():
        pytest.skip(f"real data missing: {si}")
    small = sorted(read(si, index=":"), key=len)[:3]
    (tmp_path / "data" / "si_mlearn").mkdir(parents=True)
    write(tmp_path / "data" / "si_mlearn" / "Si_train.xyz", small[:2])
    write(tmp_path / "data" / "si_mlearn" / "Si_test.xyz", small[2:])
    monkeypatch.setenv("SPARSEKERN_DATA", str(tmp_path / "data"))
    assert demo.main(["--epochs", "1", "--every", "1", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "2 training frames, 1 test frames" in out and "changed:" in out and "in SevenNetCalculator" in out
    assert "loss weights energy 100 forces 100" in out
    assert (tmp_path / "demo" / "sparse" / "adapter.report.png").stat().st_size > 0
    assert f"learning curves: {tmp_path / 'demo' / 'sparse' / 'training.png'}" in out
    assert (tmp_path / "demo" / "sparse" / "training.png").stat().st_size > 0
    # rerun into the same --out with other arguments: one line naming the difference, no traceback
    with pytest.raises(SystemExit) as stop:
        demo.main(["--epochs", "1", "--every", "1", "--out", str(tmp_path / "demo"), "--energy_weight", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "written for different arguments (energy_weight: checkpoint 100.0 vs now 1.0)" in err, err
    with pytest.raises(SystemExit) as stop:  # refused before anything is written
        demo.main(["--energy_weight", "-1", "--out", str(tmp_path / "bad")])
    assert stop.value.code == 2 and "loss weights must be finite and >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_demo_refuses_in_one_line_before_writing(tmp_path, monkeypatch, capsys):
    """An --out that is a file, or no sevenn: one line, exit 2, nothing written (the
    demo's training file was written first, then a traceback)."""
    import importlib.util

    from sparsekern import demo

    (tmp_path / "data" / "si_mlearn").mkdir(parents=True)
    (tmp_path / "data" / "si_mlearn" / "Si_train.xyz").write_text("")  # (not read before the checks)
    monkeypatch.setenv("SPARSEKERN_DATA", str(tmp_path / "data"))
    (tmp_path / "file").write_text("")
    cases = [(tmp_path / "file", "output folder {out}/sparse cannot be made: {out} is a file")]
    if importlib.util.find_spec("sevenn") is None:
        cases.append((tmp_path / "demo", "is a sevennet model, but sevenn is not installed"))
    for out, says in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            demo.main(["--out", str(out)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and says.format(out=out) in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("sparsekern.demo: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file"] and (tmp_path / "file").read_text() == ""


def test_lora_adapter_holds_the_factors_and_round_trips(files, tmp_path):
    from ase.io import read

    from sparsekern.finetune.adapters import load_adapter, save_adapter
    from sparsekern.integrations.mace.models import mace_batch

    model = sparsekern.prepare(torch.load(files / "tiny.model", weights_only=False),
                               sparsekern.SparseConfig(mode="lora", lora_rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)  # a trained-looking adapter (B starts at zero)
    batch = mace_batch(model, read(files / "test.xyz", ":"))
    expected = model(batch, compute_force=True)["energy"].detach()
    path = save_adapter(model, tmp_path / "lora.safetensors")
    factors = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert path.stat().st_size < 8 * factors + 65536  # the factors, not the dense product
    fresh = load_adapter(torch.load(files / "tiny.model", weights_only=False), path)
    assert torch.equal(fresh(batch, compute_force=True)["energy"].detach(), expected)
    other = torch.load(files / "tiny.model", weights_only=False)
    with torch.no_grad():
        next(p for p in other.parameters() if p.dim() > 1).add_(1.0)
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(other, path)


def test_training_settings_are_the_trainer_s():
    """What scripts (benchmarks/magnetism.py) pass to ``trainer.run``: a command line read as
    the command reads it, --loss turned into weights and a penalty, without --config or --nproc (the
    script passed the parser's namespace, which gained both, and broke)."""
    from sparsekern.cli.finetune import training_settings
    from sparsekern.finetune.settings import Settings

    settings = training_settings(["--model", "m.model", "--train", "t.xyz", "--out", "o", "--method", "sparse",
                                  "--loss", "forces_only"])
    assert not {"config", "nproc"} & set(settings) and settings["loss"] == "weighted"  # the penalty
    assert Settings(**settings).energy_weight == 0.0
