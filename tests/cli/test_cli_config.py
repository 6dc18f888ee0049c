"""MACE's command-line conventions in ``sparsekern finetune``: a YAML ``--config``,
MACE's option names beside ours, virial labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsekern.cli import main
from sparsekern.cli.config_file import with_config
from sparsekern.cli.finetune import parser


def _parsed(argv):
    p = parser()
    return vars(p.parse_args(with_config(p, argv)))


def _yaml(path, text):
    path.write_text(text)
    return str(path)


def test_config_file_and_maces_names_are_the_command_line(tmp_path):
    """A MACE-style YAML (MACE's option names, a mapping for E0s, switches as booleans)
    parses to what the same options on the command line parse to; the command line wins."""
    config = _yaml(tmp_path / "c.yaml", "foundation_model: m.model\ntrain_file: t.xyz\nvalid_file: v.xyz\n"
                                        "test_file: s.xyz\nmethod: sparse\nmax_num_epochs: 7\nlr: 1e-3\n"
                                        "swa: true\nstart_swa: 5\nema: false\nno_progress: true\ncuda_graphs: false\n"
                                        "E0s: {13: -3.5, 29: -4.25}\nstress_weight: 10\nvirials_key: VIR\n"
                                        "keep_isolated_atoms: true\ndensity:\nname: o\namsgrad: true\n")
    explicit = ["--model", "m.model", "--train", "t.xyz", "--valid", "v.xyz", "--test", "s.xyz", "--method", "sparse",
                "--epochs", "7", "--lr", "0.001", "--stage_two", "--start_stage_two", "5", "--no_ema", "--no_progress",
                "--E0s", "{13: -3.5, 29: -4.25}", "--stress_weight", "10", "--virials_key", "VIR", "--keep_isolated_atoms",
                "--out", "o"]
    from_config = _parsed(["--config", config])
    assert from_config == _parsed(explicit)
    assert from_config["config"] is None and from_config["ema"] is False and from_config["density"] == 0.03
    assert from_config["amsgrad"] is True and _parsed([*explicit, "--no_amsgrad"])["amsgrad"] is False
    assert _parsed(["--config", _yaml(tmp_path / "d.yaml", "amsgrad: false\n"), *explicit])["amsgrad"] is False
    assert _parsed(["--config", _yaml(tmp_path / "e.yaml", "energy_key: -E\n"), *explicit])["energy_key"] == "-E"
    later = _parsed([f"--config={config}", "--out", "o", "--max_num_epochs", "9", "--train", "u.xyz", "--ema"])
    assert later == {**from_config, "epochs": 9, "train": "u.xyz", "ema": True}


_REQUIRED = ["--model", "m.model", "--train", "t.xyz", "--method", "sparse", "--out", "o"]


def _loss_args(*flags):
    from sparsekern.cli.finetune import _weights_of_loss

    p = parser()
    args = p.parse_args(with_config(p, [*_REQUIRED, *flags]))
    _weights_of_loss(p, args)
    return args


def _weights(*flags):
    args = _loss_args(*flags)
    return args.energy_weight, args.forces_weight, args.stress_weight


def test_maces_loss_is_the_weights_it_implies(tmp_path):
    """MACE's --loss (command line or config file) sets the weights MACE's loss of that
    name has, at MACE's defaults where they are not given."""
    assert _weights() == _weights("--loss", "weighted") == _weights("--loss", "ef") == (1.0, 100.0, 0.0)
    assert _weights("--loss", "stress") == (1.0, 100.0, 1.0)
    assert _weights("--loss", "stress", "--stress_weight", "10") == _weights("--stress_weight", "10") == (1, 100, 10)
    assert _weights("--loss", "forces_only", "--forces_weight", "5") == (0.0, 5.0, 0.0)
    assert _weights("--config", _yaml(tmp_path / "l.yaml", "loss: stress\n")) == (1.0, 100.0, 1.0)
    assert _weights("--energy_weight", "0.5") == (0.5, 100.0, 0.0)
    assert _weights("--loss", "huber") == _weights("--loss", "universal") == (1.0, 100.0, 0.0)
    assert _weights("--loss", "universal", "--stress_weight", "10") == (1.0, 100.0, 10.0)
    # MACE's virials loss: the stress term as virials per atom, at --virials_weight (MACE's 1)
    virials = _loss_args("--loss", "virials", "--stage_two", "--stage_two_virials_weight", "20")
    assert (virials.virials, virials.stress_weight, virials.stage_two_stress_weight) == (True, 1.0, 20.0)
    assert _weights("--loss", "virials", "--virials_weight", "3") == (1.0, 100.0, 3.0)
    assert not _loss_args("--loss", "stress").virials
    # the trainer's penalty: mean squares but for MACE's Huber losses
    assert [_loss_args(*f).loss for f in ((), ("--loss", "ef"), ("--loss", "stress"), ("--loss", "forces_only"),
                                          ("--loss", "huber"), ("--loss", "universal"))] == [
        "weighted", "weighted", "weighted", "weighted", "huber", "universal"]


@pytest.mark.parametrize("flags, said", [
    (["--loss", "dipole"], "--loss dipole is not offered: sparsekern trains MACE's weighted, ef, stress, virials, "
                           "forces_only, huber, universal losses"),
    (["--virials_weight", "2"], "--virials_weight weigh MACE's virials term: give --loss virials"),
    (["--loss", "stress", "--swa_virials_weight", "2"], "--stage_two_virials_weight weigh MACE's virials term"),
    (["--loss", "virials", "--stress_weight", "1"], "--loss virials weighs the virials: --stress_weight -> "
                                                    "--virials_weight"),
    (["--loss", "ef", "--stress_weight", "1"], "--loss ef does not train stresses: --stress_weight needs --loss "
                                               "stress, huber or universal"),
    (["--loss", "weighted", "--stress_weight", "1"], "--loss weighted does not train stresses: --stress_weight "
                                                     "needs --loss stress"),
    (["--loss", "forces_only", "--energy_weight", "1"], "--loss forces_only trains forces alone"),
    (["--loss", "forces_only", "--stage_two"], "--stage_two raises the energies' weight: not with --loss forces_only"),
])
def test_a_loss_at_odds_with_the_weights_is_refused_in_one_line(capsys, flags, said):
    with pytest.raises(SystemExit) as stop:
        _weights(*flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and said in err and len(err.strip().splitlines()) == 1, err


def test_maces_fine_tuning_command_runs(files, tmp_path, monkeypatch):
    """MACE's documented fine-tuning command line (its options but --scaling, which MACE
    overrides with the foundation model's scale and shift; with those options of the
    naive fine-tuning command whose values state what sparsekern does) runs with --method added:
    --name is the output folder; --no_amsgrad trains plain Adam, and is part of the
    checkpoint's identity."""
    import torch

    monkeypatch.chdir(tmp_path)
    mace = ["--name=MACE", f"--foundation_model={files / 'tiny.model'}", f"--train_file={files / 'train.xyz'}",
            "--valid_fraction=0.34", f"--test_file={files / 'test.xyz'}", "--energy_weight=1.0", "--forces_weight=1.0",
            "--E0s=average", "--lr=0.01", "--batch_size=2", "--max_num_epochs=1", "--ema", "--ema_decay=0.99",
            "--amsgrad", "--default_dtype=float32", "--device=cpu", "--seed=3",
            # the naive fine-tuning command's (mace-docs) that state what sparsekern does
            "--multiheads_finetuning=False", "--weight_decay=0.0", "--save_cpu", "--restart_latest",
            "--eval_interval", "1"]
    assert main(["finetune", "--method", "sparse", "--no_progress", *mace]) == 0
    plain = [a for a in mace if a != "--amsgrad"]  # (--amsgrad and --no_amsgrad together are refused)
    assert main(["finetune", "--method", "sparse", "--no_progress", *plain, "--no_amsgrad"]) == 2  # another run
    assert main(["finetune", "--method", "sparse", "--no_progress", *plain, "--no_amsgrad", "--name", "plain"]) == 0
    for name, amsgrad in (("MACE", True), ("plain", False)):  # (a few steps of either give the same weights)
        optimizer = torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["optimizer"]
        assert all(g["amsgrad"] == amsgrad for g in optimizer["param_groups"])
        assert all(("max_exp_avg_sq" in state) == amsgrad for state in optimizer["state"].values())


def test_valid_batch_size_batches_the_evaluations_only(files, tmp_path):
    """MACE's --valid_batch_size: the validation and test errors of batches of 1 frame are
    those of one batch, and a run resumes under another value."""
    run = ["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"), "--valid",
           str(files / "train.xyz"), "--test", str(files / "test.xyz"), "--method", "sparse", "--no_progress"]
    assert main([*run, "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    assert main([*run, "--epochs", "1", "--out", str(tmp_path / "b"), "--valid_batch_size", "1"]) == 0
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    errors = [k for k in a if k.startswith(("test_", "zero_shot_")) and isinstance(a[k], float)]
    assert len(errors) >= 8 and all(b[k] == pytest.approx(a[k], rel=1e-12) for k in errors)
    (first_a,), (first_b,) = a["history"], b["history"]
    assert first_b["valid_loss"] == pytest.approx(first_a["valid_loss"], rel=1e-12)
    assert all(first_b["valid"][k] == pytest.approx(v, rel=1e-12) for k, v in first_a["valid"].items())
    assert main([*run, "--epochs", "2", "--out", str(tmp_path / "a"), "--valid_batch_size", "1"]) == 0  # resumed
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["epochs"] == 2


def test_a_forces_only_run_trains_without_the_energies(files, tmp_path):
    """--loss forces_only: the energies out of the loss (and out of the checkpoint's
    weights), their errors still reported."""
    assert main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"), "--test",
                 str(files / "test.xyz"), "--method", "sparse", "--no_progress", "--epochs", "1", "--loss",
                 "forces_only", "--out", str(tmp_path / "f")]) == 0
    metrics = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert metrics["settings"]["energy_weight"] == 0.0 and np.isfinite(metrics["test_energy_mae_mev_per_atom"])


def test_a_run_from_a_config_file_is_the_run_from_its_options(files, tmp_path):
    """`finetune --config` trains and tests what the same options given one by one do."""
    common = {"method": "sparse", "lr": 0.02, "no_progress": True, "max_num_epochs": 1}
    paths = {"foundation_model": files / "tiny.model", "train_file": files / "train.xyz",
             "test_file": files / "test.xyz"}
    config = _yaml(tmp_path / "run.yaml", "".join(f"{k}: {v}\n" for k, v in {**common, **paths}.items()))
    assert main(["finetune", "--config", config, "--out", str(tmp_path / "a")]) == 0
    assert main(["finetune", "--model", str(paths["foundation_model"]), "--train", str(paths["train_file"]),
                 "--test", str(paths["test_file"]), "--method", "sparse", "--lr", "0.02", "--no_progress",
                 "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert a["settings"] == {**b["settings"], "out": str(tmp_path / "a")}
    for key in ("test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A", "changed_fraction"):
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("text, said", [
    ("r_max: 5.0\nhidden_irreps: 128x0e\n", "MACE's --r_max: a fine-tuned foundation model keeps its architecture and "
                                            "statistics (MACE's too); MACE's --hidden_irreps: a fine-tuned foundation "
                                            "model keeps its architecture and statistics (MACE's too): leave them out"),
    ("scaling: rms_forces_scaling\nmy_option: 1\n", "MACE's --scaling: a fine-tuned foundation model keeps its "
                                                   "architecture and statistics (MACE's too); this command has "
                                                   "no option --my_option"),
    ("model: MACE\nfoundation_model: m.model\n", "--model MACE names MACE's architecture (MACE's --model)"),
    ("train: a.xyz\ntrain_file: a.xyz\n", "train and train_file set the same option: keep one"),
    ("multiheads_finetuning: true\n", "MACE's --multiheads_finetuning: replay fine-tuning on the foundation's "
                                     "training data is not offered"),
    ("ema: true\nno_ema: true\n", "set the same option: keep one"),
    ("swa: 3\n", "swa is a switch: give true or false, got 3"),
    ("train_file: [a.xyz, b.xyz]\n", "train_file takes one value, got a list"),
    ("- train_file\n", "expected a mapping of option names to values, got list"),
    ("lr: [1\n", "not YAML"),
    ("config: other.yaml\n", "this command has no option --config"),
])
def test_bad_config_files_are_refused_in_one_line(tmp_path, capsys, text, said):
    config = _yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--config", config, "--method", "sparse", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, said", [
    (["--config", "missing.yaml"], "--config: file not found: missing.yaml"),
    (["--config"], "--config needs a YAML file"),
    (["--config", "a.yaml", "--config", "b.yaml"], "--config given twice"),
    (["--conf", "a.yaml", "--model", "m", "--train", "t", "--method", "full"], "unrecognized arguments: --conf a.yaml"),
    (["--model", "m", "--train", "t", "--method", "full", "--scaling", "rms_forces_scaling"],
     "MACE's --scaling: a fine-tuned foundation model keeps its architecture and statistics (MACE's too): leave it "
     "out"),
    (["--model", "m", "--train", "t", "--method", "lora", "--lora", "--lora_rank", "8"],  # (not read as --lora_rank)
     "MACE's --lora: LoRA is --method lora here (its rank: --lora_rank): leave it out"),
    (["--model", "m", "--train", "t", "--method", "full", "--restart_latest", "--clip_grad", "10", "--my_option", "3"],
     "MACE's --clip_grad: the optimizer is Adam (--amsgrad, --no_amsgrad) at --lr under --lr_schedule constant or "
     "cosine, without weight decay or clipping; unrecognized arguments: --my_option 3"),
    (["--model", "ScaleShiftMACE", "--foundation_model", "m.model", "--train", "t", "--method", "full"],
     "--model ScaleShiftMACE names MACE's architecture (MACE's --model); here --model (--foundation_model) is the "
     "model fine-tuned, whose architecture is kept: leave MACE's --model out"),
    (["--model", "m", "--train", "t", "--method", "full", "--mean", "-1.5", "--std=2"],
     "MACE's --mean: a fine-tuned foundation model keeps its architecture and statistics (MACE's too); MACE's --std: "
     "a fine-tuned foundation model keeps its architecture and statistics (MACE's too): leave them out"),
    (["--model", "m", "--train", "t", "--method", "full", "--multiheads_finetuning", "True"],
     "MACE's --multiheads_finetuning: replay fine-tuning on the foundation's training data is not offered"),
    (["--model", "m", "--train", "t", "--method", "full", "--loss", "virials", "--virials_weight", "-1"],
     "loss weights must be finite and >= 0, got --virials_weight -1"),
    (["--model", "m", "--train", "t", "--method", "full", "--valid_batch_size", "0"],
     "--valid_batch_size must be >= 1, got 0"),
    (["--model", "m", "--train", "t", "--method", "full", "--ema", "--no_ema"],  # (the last one won, silently)
     "--ema and --no_ema set the same option both ways: keep one"),
    (["--model", "m", "--train", "t", "--method", "full", "--no_amsgrad", "--swa", "--amsgrad"],
     "--amsgrad and --no_amsgrad set the same option both ways: keep one"),
])
def test_bad_options_and_maces_others_are_refused_in_one_line(tmp_path, capsys, argv, said):
    try:
        code = main(["finetune", *argv, "--out", str(tmp_path / "out")])
    except SystemExit as stop:  # (the parser's refusals)
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# MACE's options at the value that states what finetune does anyway (MACE's defaults)
_STATING = {"compute_forces": True, "plot": True, "lora": False, "distributed": False, "enable_cueq": False,
            "wandb": False}


def test_maces_options_stating_what_finetune_does_are_accepted(tmp_path, capsys):
    """Those options at that value are accepted, from a --config file (YAML's booleans)
    and on the command line (MACE's str2bool words), and change nothing; the other value
    is refused in one line with its reason."""
    from sparsekern.cli.finetune import _parsed as finetune_parsed
    from sparsekern.cli.mace_options import reason

    plain = finetune_parsed(_REQUIRED)
    config = _yaml(tmp_path / "stating.yaml", "".join(f"{k}: {v}\n" for k, v in _STATING.items()))
    assert finetune_parsed(["--config", config, *_REQUIRED]) == plain
    words = ["--compute_forces", "True", "--plot=yes", "--lora", "false", "--enable_cueq", "F", "--wandb=0"]
    assert finetune_parsed([*_REQUIRED, *words]) == plain
    for key, value in _STATING.items():
        with pytest.raises(SystemExit):
            finetune_parsed(["--config", _yaml(tmp_path / f"{key}.yaml", f"{key}: {not value}\n"), *_REQUIRED])
        err = capsys.readouterr().err
        assert f"MACE's --{key}: {reason(key)}: leave it out" in err and len(err.strip().splitlines()) == 1, err


def test_the_command_line_overrides_a_config_files_switch(tmp_path):
    """A switch in the --config file and its opposite on the command line: the command
    line wins (only both on the command line are refused)."""
    from sparsekern.cli.finetune import _parsed as finetune_parsed

    for text, flag, dest, value in (("ema: false\n", "--ema", "ema", True), ("ema: true\n", "--no_ema", "ema", False),
                                    ("no_amsgrad: true\n", "--amsgrad", "amsgrad", True)):
        config = _yaml(tmp_path / "switch.yaml", text)
        assert getattr(finetune_parsed(["--config", config, *_REQUIRED, flag]), dest) is value


def test_virials_are_read_as_stresses(files, tmp_path):
    """MACE's virials W under REF_virials read as the stress -W/V that REF_stress holds;
    a frame with both labels takes its stress."""
    from ase.io import read, write
    from helpers import with_stresses
    from sparsekern.finetune.data import read_frames

    (tmp_path / "s").mkdir()
    (tmp_path / "v").mkdir()
    stressed, _ = with_stresses(files, tmp_path / "s")
    virial, _ = with_stresses(files, tmp_path / "v", virials=True)
    by_stress = read_frames(stressed, stress_key="REF_stress", virials_key="REF_virials")
    by_virials = read_frames(virial, stress_key="REF_stress", virials_key="REF_virials")
    for s, v in zip(by_stress, by_virials):
        assert np.abs(s.stress).max() > 1e-4
        np.testing.assert_allclose(v.stress, s.stress, rtol=1e-12, atol=1e-15)
    both = read(virial, ":")
    for atoms, frame in zip(both, by_stress):
        atoms.info["REF_stress"] = 2 * frame.stress.reshape(-1)
    write(tmp_path / "both.xyz", both)
    for s, b in zip(by_stress, read_frames(tmp_path / "both.xyz", stress_key="REF_stress", virials_key="REF_virials")):
        np.testing.assert_allclose(b.stress, 2 * s.stress, rtol=1e-12)


def test_virial_training_is_stress_training(files, tmp_path, capsys):
    """A run on virial labels is the run on the same frames' stresses; --virials_key
    without --stress_weight is refused."""
    from helpers import with_stresses

    def run(folder, virials, *extra):
        (tmp_path / folder).mkdir()
        train, test = with_stresses(files, tmp_path / folder, unlabelled=(1,), virials=virials)
        return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(train), "--test", str(test),
                     "--method", "sparse", "--epochs", "1", "--lr", "0.02", "--no_progress",
                     "--out", str(tmp_path / folder / "out"), *extra])

    assert run("s", False, "--stress_weight", "100") == 0
    assert run("v", True, "--stress_weight", "100") == 0
    s, v = (json.loads((tmp_path / x / "out" / "metrics.json").read_text()) for x in "sv")
    assert s["test_stress_mae_mev_per_A3"] > 0
    for key in ("test_stress_mae_mev_per_A3", "zero_shot_test_stress_mae_mev_per_A3", "test_force_mae_mev_per_A"):
        assert v[key] == pytest.approx(s[key], rel=1e-9)
    capsys.readouterr()
    assert run("r", True, "--virials_key", "REF_virials") == 2
    err = capsys.readouterr().err
    assert "--virials_key names the stress labels --stress_weight trains" in err and len(err.strip().splitlines()) == 1
    assert run("n", True, "--stress_weight", "1", "--virials_key", "VIR") == 2
    assert "no training frame has a stress under 'REF_stress' or virials under 'VIR'" in capsys.readouterr().err


def test_default_dtype_trains_and_saves_in_that_dtype(files, tmp_path):
    """--default_dtype float32 trains the float64 tiny model in float32 and saves it so;
    its errors are the float64 run's to float32's round-off over one epoch; a checkpoint
    of one dtype is not resumed in the other."""
    import torch

    def run(out, *extra):
        return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"),
                     "--test", str(files / "test.xyz"), "--method", "sparse", "--epochs", "1", "--lr", "0.02",
                     "--no_progress", "--out", str(out), *extra])

    assert run(tmp_path / "f32", "--default_dtype", "float32") == 0
    assert run(tmp_path / "f64") == 0
    single, double = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in ("f32", "f64"))
    merged = torch.load(single["merged_model"], weights_only=False)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert {p.dtype for p in torch.load(double["merged_model"], weights_only=False).parameters()} == {torch.float64}
    for key in ("test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A"):
        assert single[key] == pytest.approx(double[key], rel=1e-3) and single[key] != double[key]
    assert single["merged_model_check"]["max_abs_force_diff_ev_per_A"] <= 1e-5
    assert run(tmp_path / "f32", "--default_dtype", "float64") == 2  # another run's checkpoint


def test_default_dtype_refusals(tmp_path, capsys):
    pytest.importorskip("sevenn")
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.io import write

    atoms = bulk("Cu", cubic=True)
    atoms.calc = EMT()
    atoms.info["REF_energy"], atoms.arrays["REF_forces"] = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = None
    write(tmp_path / "cu.xyz", [atoms])
    assert main(["finetune", "--model", "7net-0", "--train", str(tmp_path / "cu.xyz"), "--method", "sparse",
                 "--default_dtype", "float64", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--default_dtype float64: sevennet models train in float32" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_isolated_atoms_are_set_aside_as_mace_does(files, tmp_path, capsys):
    """MACE's IsolatedAtom frames (energy only) in the training file are not trained: the
    run is the run without them, metrics.json lists them, a warning gives their energies
    as an --E0s; --keep_isolated_atoms (MACE's, also with a value) keeps them."""
    from ase import Atoms
    from ase.io import read, write

    frames = read(files / "train.xyz", ":")
    isolated = []
    for z, energy in ((13, -0.25), (29, -0.5)):
        atom = Atoms(numbers=[z], cell=[12.0] * 3, pbc=False)
        atom.info.update(REF_energy=energy, config_type="IsolatedAtom")
        isolated.append(atom)
    write(tmp_path / "with_isolated.xyz", [isolated[0], *frames, isolated[1]])

    def run(out, train, *extra):
        return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(train), "--test",
                     str(files / "test.xyz"), "--method", "sparse", "--epochs", "1", "--lr", "0.02", "--no_progress",
                     "--out", str(tmp_path / out), *extra])

    capsys.readouterr()
    assert run("with", tmp_path / "with_isolated.xyz") == 0
    err = capsys.readouterr().err
    assert ("warning: isolated-atom frames (MACE's IsolatedAtom) set aside, not trained or evaluated: 2 train (MACE "
            "sets aside the training file's; --keep_isolated_atoms keeps them; their energies as the E0s: --E0s "
            "isolated, or '{13: -0.25, 29: -0.5}')"
            in err), err
    assert run("without", files / "train.xyz") == 0
    w, wo = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in ("with", "without"))
    assert w["isolated_atoms_set_aside"] == {"train": {"13": -0.25, "29": -0.5}} and w["n_train"] == 3
    assert "isolated_atoms_set_aside" not in wo
    for key in ("test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A", "changed_params"):
        assert w[key] == pytest.approx(wo[key], rel=1e-12)
    for k, keep in enumerate((("--keep_isolated_atoms",), ("--keep_isolated_atoms", "True"))):
        assert run(f"kept{k}", tmp_path / "with_isolated.xyz", *keep) == 0  # (a lone atom's force: 0)
        assert json.loads((tmp_path / f"kept{k}" / "metrics.json").read_text())["n_train"] == 5
    with pytest.raises(SystemExit) as stop:
        run("bad", tmp_path / "with_isolated.xyz", "--keep_isolated_atoms", "maybe")
    assert stop.value.code == 2 and "expected True or False, got 'maybe'" in capsys.readouterr().err
    # --E0s isolated: MACE's E0s from them, as the same dict given
    capsys.readouterr()
    assert run("iso", tmp_path / "with_isolated.xyz", "--E0s", "isolated") == 0
    assert "--keep_isolated_atoms keeps them)" in capsys.readouterr().err  # (no hint to do what it does)
    assert run("dict", files / "train.xyz", "--E0s", "{13: -0.25, 29: -0.5}") == 0
    iso, given = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in ("iso", "dict"))
    assert iso["e0_shift_ev"] == given["e0_shift_ev"] and iso["test_force_mae_mev_per_A"] == given[
        "test_force_mae_mev_per_A"]
    # frames without an energy (an element of no training frame; one after an energy) are not E0s
    blank = [Atoms(numbers=[z], cell=[12.0] * 3, pbc=False, info={"config_type": "IsolatedAtom"}) for z in (28, 13)]
    write(tmp_path / "blanks.xyz", [isolated[0], *frames, isolated[1], *blank])
    assert run("blanks", tmp_path / "blanks.xyz", "--E0s", "isolated") == 0
    blanks = json.loads((tmp_path / "blanks" / "metrics.json").read_text())
    assert blanks["e0_shift_ev"] == given["e0_shift_ev"]
    # with --keep_isolated_atoms too, as MACE: their energies the E0s, and they train
    assert run("kept_iso", tmp_path / "with_isolated.xyz", "--E0s", "isolated", "--keep_isolated_atoms") == 0
    kept = json.loads((tmp_path / "kept_iso" / "metrics.json").read_text())
    assert kept["n_train"] == 5 and "isolated_atoms_set_aside" not in kept
    assert kept["e0_shift_ev"] == given["e0_shift_ev"]
    capsys.readouterr()
    assert run("refused", files / "train.xyz", "--E0s", "isolated") == 2
    err = capsys.readouterr().err
    assert "no IsolatedAtom frame with an energy for atomic numbers [13, 29]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    write(tmp_path / "only.xyz", isolated)
    assert run("only", tmp_path / "only.xyz") == 2
    assert "holds isolated atoms only" in capsys.readouterr().err
    # --max_train counts configurations (isolated atoms before and after them are still read)
    assert run("two", tmp_path / "with_isolated.xyz", "--max_train", "2", "--E0s", "isolated") == 0
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["n_train"] == 2 and two["isolated_atoms_set_aside"] == {"train": {"13": -0.25, "29": -0.5}}
    isolated[1].info["REF_energy"] = float("nan")
    write(tmp_path / "nan.xyz", [*frames, isolated[1]])
    assert run("nan", tmp_path / "nan.xyz") == 2
    assert "nan.xyz frame 3: energy is nan: not a finite number" in capsys.readouterr().err


def test_e0s_keywords_are_read_in_any_case():
    """MACE lowercases --E0s's keywords (--E0s Foundation, AVERAGE); a dict is read as given."""
    from sparsekern.cli.finetune import training_settings
    from sparsekern.finetune.settings import Settings

    for given, read in (("Foundation", "foundation"), ("AVERAGE", "average"), ("Estimated", "estimated"),
                        ("Isolated", "isolated"), ("{13: -3.5}", "{13: -3.5}")):
        assert Settings(**training_settings([*_REQUIRED, "--E0s", given])).e0s == read


def test_every_option_of_maces_is_taken_or_refused_with_a_reason():
    """Each of MACE's training options is one of finetune's (by its MACE name) or has a
    reason in mace_options (a MACE update that adds options fails here first)."""
    pytest.importorskip("mace")
    from mace.tools.arg_parser import build_default_arg_parser

    from sparsekern.cli.mace_options import reason

    mace = {s[2:] for a in build_default_arg_parser()._actions for s in a.option_strings if s.startswith("--")}
    ours = {s[2:] for a in parser()._actions for s in a.option_strings if s.startswith("--")}
    assert sorted(k for k in mace - ours if not reason(k)) == []


def test_the_virials_loss_reads_the_virials_first(files, tmp_path):
    """A frame with a stress and a virials label: --loss virials trains its virials (at
    config_virials_weight), as MACE's virials loss does; the stress loss its stress."""
    from ase.io import read, write
    from helpers import with_stresses
    from sparsekern.finetune.data import read_frames

    (tmp_path / "s").mkdir()
    (tmp_path / "v").mkdir()
    stressed, _ = with_stresses(files, tmp_path / "s")
    virial, _ = with_stresses(files, tmp_path / "v", virials=True)
    both = read(virial, ":")
    for atoms, label in zip(both, read(stressed, ":")):
        atoms.info.update(REF_stress=2 * label.info["REF_stress"], config_stress_weight=0.0, config_virials_weight=0.5)
    write(tmp_path / "both.xyz", both)
    keys = dict(stress_key="REF_stress", virials_key="REF_virials")
    as_stress, as_virials = (read_frames(tmp_path / "both.xyz", **keys, virials=v) for v in (False, True))
    for s, v, atoms in zip(as_stress, as_virials, both):
        np.testing.assert_allclose(s.stress, 2 * v.stress, rtol=1e-12)
        assert s.weights["stress"] == 0.0
        assert v.weights["stress"] == pytest.approx(0.5 * (atoms.get_volume() / len(atoms)) ** 2, rel=1e-12)
