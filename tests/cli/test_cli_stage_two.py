"""MACE's Stage Two (``--stage_two``, alias ``--swa``) in ``sparsekern finetune``: from
``--start_stage_two`` on, every step's loss has Stage Two's weights and every parameter
group's lr is scaled by --stage_two_lr / --lr, eager and replayed alike; the validation
loss takes Stage Two's weights and the result is chosen among Stage Two's epochs."""

import json

import pytest
import torch

from sparsekern.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    pytest.importorskip("mace")
    from helpers import labelled_by_the_model, write_tiny_mace_case

    root = write_tiny_mace_case(tmp_path_factory.mktemp("stage_two"), n_train=3, n_test=2)
    labelled_by_the_model(root / "tiny.model", root / "test.xyz", root / "valid.xyz")
    return root


def _run(files, out, *extra, epochs=3):
    return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"),
                 "--test", str(files / "test.xyz"), "--method", "sparse", "--epochs", str(epochs), "--lr", "0.02",
                 "--batch_size", "2", "--out", str(out), "--no_progress", *extra])


def _steps(monkeypatch):
    """What each optimizer step trains with: (epoch, energy weight, forces weight, the lr of
    every parameter group over its base lr)."""
    from sparsekern.finetune import trainer

    seen = []
    step = trainer._step

    def recorded(loop, batch, epoch):
        seen.append((epoch, loop.settings.energy_weight, loop.settings.forces_weight,
                     {round(g["lr"] / g["base_lr"], 12) for g in loop.optimizer.param_groups}))
        return step(loop, batch, epoch)

    monkeypatch.setattr(trainer, "_step", recorded)
    return seen


def test_stage_two_switches_weights_and_lr_at_its_start(files, monkeypatch):
    seen = _steps(monkeypatch)
    assert _run(files, files / "swa", "--swa", "--start_swa", "2", "--stage_two_energy_weight", "50",
                "--swa_lr", "0.005") == 0
    # 2 steps an epoch (3 frames in batches of 2); Stage Two from the third epoch
    assert seen == [(e, 1.0, 100.0, {1.0}) for e in (0, 0, 1, 1)] + [(2, 50.0, 100.0, {0.25})] * 2
    m = json.loads((files / "swa" / "metrics.json").read_text())
    s = m["settings"]
    assert (s["stage_two"], s["start_stage_two"], s["stage_two_forces_weight"], s["stage_two_lr"]) == (
        True, 2, 100.0, 0.005)
    # MACE's defaults: Stage Two over the last quarter, energy 1000, lr / 10
    seen.clear()
    assert _run(files, files / "defaults", "--stage_two", epochs=4) == 0
    assert seen[-2:] == [(3, 1000.0, 100.0, {0.1})] * 2 and seen[-3][1] == 1.0


def test_stage_two_replayed_is_stage_two_eager(files, monkeypatch):
    """Under --cuda_graphs (fake graphs on the CPU) Stage Two's weights reach the replays'
    loss: the run is the eager run."""
    from safetensors.torch import load_file

    from helpers import fake_cuda_graphs

    flags = ("--stage_two", "--start_stage_two", "1", "--device", "cpu")
    assert _run(files, files / "eager", *flags) == 0
    fake_cuda_graphs(monkeypatch)
    assert _run(files, files / "graphed", *flags, "--cuda_graphs") == 0
    got, want = (load_file(files / d / "adapter.safetensors") for d in ("graphed", "eager"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-15)
    got, want = (json.loads((files / d / "metrics.json").read_text()) for d in ("graphed", "eager"))
    assert [h["train_loss"] for h in got["history"]] == pytest.approx([h["train_loss"] for h in want["history"]],
                                                                      rel=1e-12)


def test_the_result_is_chosen_among_stage_two_epochs(files):
    """Validation frames labelled by the base model: epoch 1 has the lowest loss, but Stage
    Two starts after it, and its validation loss has Stage Two's weights."""
    out = files / "valid"
    assert _run(files, out, "--valid", str(files / "valid.xyz"), "--E0s", "foundation", "--stage_two",
                "--start_stage_two", "1", "--stage_two_energy_weight", "7") == 0
    m = json.loads((out / "metrics.json").read_text())
    losses = [h["valid_loss"] for h in m["history"]]
    assert losses[0] < losses[1] < losses[2]
    assert (m["selected_epoch"], m["best_valid_loss_epoch"]) == (2, 2)
    assert m["selected_by"] == "lowest validation loss of Stage Two's epochs"
    plain = files / "valid_plain"
    assert _run(files, plain, "--valid", str(files / "valid.xyz"), "--E0s", "foundation", epochs=1) == 0
    first = json.loads((plain / "metrics.json").read_text())["history"][0]
    assert losses[0] == pytest.approx(first["valid_loss"], rel=1e-12)  # stage one's weights before the start
    for h, energy_weight in zip(m["history"], (1.0, 7.0, 7.0)):  # weights times mean squares (RMSEs in meV)
        v = h["valid"]
        want = 1e-6 * (energy_weight * v["energy_rmse_mev_per_atom"] ** 2 + 100.0 * v["force_rmse_mev_per_A"] ** 2)
        assert h["valid_loss"] == pytest.approx(want, rel=1e-9)


def test_the_base_is_judged_with_the_results_weights(files, tmp_path):
    """A result chosen in Stage Two is compared with the base model's validation loss
    under Stage Two's weights (here the validation frames are the test frames: the base's
    errors on them are the zero-shot test errors)."""
    out = tmp_path / "staged"
    assert _run(files, out, "--valid", str(files / "test.xyz"), "--stage_two", "--start_stage_two", "1",
                "--stage_two_energy_weight", "7", epochs=2) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["selected_epoch"] == 2
    want = 1e-6 * (7.0 * m["zero_shot_test_energy_rmse_mev_per_atom"] ** 2
                   + 100.0 * m["zero_shot_test_force_rmse_mev_per_A"] ** 2)
    assert m["zero_shot_valid_loss"] == pytest.approx(want, rel=1e-12)
    assert m["valid_loss_above_zero_shot"] == (m["history"][1]["valid_loss"] > want)


def test_patience_out_before_stage_two_starts_it(files):
    """MACE's rule: where --patience runs out before Stage Two, Stage Two starts; the
    epochs between are skipped."""
    out = files / "patience"
    assert _run(files, out, "--valid", str(files / "valid.xyz"), "--E0s", "foundation", "--patience", "1",
                "--stage_two", "--start_stage_two", "3", epochs=5) == 0
    m = json.loads((out / "metrics.json").read_text())
    # epoch 1 the best, epoch 2 not: Stage Two from epoch 4 (after 3); epoch 5, not better, is
    # --epochs' last anyway: the patience did not stop the run
    assert [h["epoch"] for h in m["history"]] == [1, 2, 4, 5]
    assert (m["selected_epoch"], m["stopped_by_patience"]) == (4, False)


def test_stage_two_flags_are_checked(files, capsys, tmp_path):
    for bad, said in ((("--start_stage_two", "1"), "--start_stage_two set Stage Two: give --stage_two"),
                      (("--swa_lr", "0.1", "--swa_energy_weight", "3"),
                       "--stage_two_energy_weight, --stage_two_lr set Stage Two: give --stage_two"),
                      (("--stage_two", "--start_stage_two", "3"), "--start_stage_two must be in [0, --epochs 3), got 3"),
                      # (no start given: the default's, not a value the user never gave)
                      (("--swa", "--epochs", "0"), "--stage_two starts after 3/4 of --epochs (at least 1 epoch), and "
                                                   "--epochs 0 leaves no epoch for it: give --epochs 2 or more"),
                      (("--swa", "--epochs", "1"), "--epochs 1 leaves no epoch for it: give --epochs 2 or more (or "
                                                   "--start_stage_two 0)"),
                      (("--stage_two", "--stage_two_stress_weight", "1"),
                       "--stage_two_stress_weight weighs the stresses --stress_weight reads"),
                      (("--stage_two", "--stage_two_forces_weight", "-1"),
                       "Stage Two's weights must be finite and >= 0 and its lr > 0, got --stage_two_forces_weight -1"),
                      (("--stage_two", "--stage_two_lr", "0"), "its lr > 0, got --stage_two_lr 0")):
        assert _run(files, tmp_path / "refused", *bad) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()


def test_more_epochs_move_stage_twos_default_start(files, capsys, tmp_path):
    """Stage Two's default start follows --epochs: a rerun with more epochs would train
    another run, so it is refused, saying how to resume (its start given); a rerun with
    another --test resumes (the test set does not change training)."""
    out = tmp_path / "s2"
    assert _run(files, out, "--stage_two", epochs=2) == 0
    capsys.readouterr()
    assert _run(files, out, "--stage_two", epochs=4) == 2
    err = capsys.readouterr().err
    assert "(start_stage_two: checkpoint 1 vs now 3)" in err and "(to resume it, pass --start_stage_two 1)" in err
    assert _run(files, out, "--stage_two", "--start_stage_two", "1", "--test", str(files / "train.xyz"),
                epochs=3) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3


def test_stage_two_s_jump_in_the_training_loss_is_no_divergence():
    """The training loss diverged where its last epoch's mean is over 10x the first's of
    the same loss weights: Stage Two's weights (here from the third epoch) raise it at
    once, and that jump is not divergence; a rise within Stage Two is."""
    from types import SimpleNamespace

    from sparsekern.finetune.trainer import _divergence

    settings = SimpleNamespace(stage_two=True, start_stage_two=2)
    history = [{"epoch": e, "train_loss": loss} for e, loss in enumerate((1.0, 0.5, 40.0, 30.0), start=1)]
    assert _divergence(history, settings) is None
    history.append({"epoch": 5, "train_loss": 401.0})
    assert _divergence(history, settings) == "epoch 5's mean training loss (401) is over 10x epoch 3's (40)"
    assert _divergence(history[:4], SimpleNamespace(stage_two=False, start_stage_two=None)) == (
        "epoch 4's mean training loss (30) is over 10x epoch 1's (1)")
