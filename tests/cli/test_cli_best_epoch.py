"""``sparsekern finetune`` with validation frames chooses its result as MACE does: the
epoch of the lowest validation loss (the training loss's weights over the whole set),
``--patience`` epochs without a lower one stop the run, ``--last_epoch`` keeps the last.
The validation frames here are labelled by the base model itself (``--E0s foundation``:
no shift), so every epoch of training on EMT's labels moves the model away from them."""

import json

import pytest
import torch

from sparsekern.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny MACE case (``write_tiny_mace_case``) and valid.xyz: its test frames with
    the base model's own energies and forces as labels."""
    pytest.importorskip("mace")
    from helpers import labelled_by_the_model, write_tiny_mace_case

    root = write_tiny_mace_case(tmp_path_factory.mktemp("best_epoch"), n_train=3, n_test=2)
    labelled_by_the_model(root / "tiny.model", root / "test.xyz", root / "valid.xyz")
    return root


def _run(files, out, *extra, epochs=3, valid=True):
    return main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"),
                 "--test", str(files / "test.xyz"), "--method", "sparse", "--epochs", str(epochs), "--lr", "0.02",
                 "--E0s", "foundation", "--out", str(out), "--no_progress",
                 *(("--valid", str(files / "valid.xyz")) if valid else ()), *extra])


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _same_result(out, reference) -> None:
    """The two runs' adapters and test errors agree (float64)."""
    from safetensors.torch import load_file

    mine, theirs = load_file(out / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-12, atol=0)
    m, r = _metrics(out), _metrics(reference)
    for k in ("test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A", "changed_params"):
        assert m[k] == pytest.approx(r[k], rel=1e-12, abs=0)


@pytest.fixture(scope="module")
def three_epochs(files):
    out = files / "three"
    assert _run(files, out) == 0
    return out


def test_the_lowest_validation_loss_is_the_result(files, three_epochs, capsys):
    m = _metrics(three_epochs)
    losses = [h["valid_loss"] for h in m["history"]]
    assert losses == sorted(losses) and losses[0] < losses[-1]  # moving away from the validation labels
    assert (m["selected_epoch"], m["selected_by"], m["epochs"]) == (1, "lowest validation loss", 3)
    assert not m["stopped_by_patience"]
    # the result is the model a one-epoch run ends with
    assert _run(files, files / "one", epochs=1) == 0
    _same_result(three_epochs, files / "one")
    # the checkpoint keeps the best: a rerun resumes at epoch 3 and selects it again
    capsys.readouterr()
    assert _run(files, three_epochs) == 0
    _same_result(three_epochs, files / "one")
    assert "the result is epoch 1 (lowest validation loss)" in capsys.readouterr().err


def test_last_epoch_keeps_the_last(files, three_epochs):
    """--last_epoch on the finished run (no training: the checkpoint is at epoch 3) gives
    the model of a run without validation."""
    assert _run(files, three_epochs, "--last_epoch") == 0
    m = _metrics(three_epochs)
    assert (m["selected_epoch"], m["selected_by"], m["best_valid_loss_epoch"]) == (3, "last epoch", 1)
    assert _run(files, files / "no_valid", valid=False) == 0
    assert _metrics(files / "no_valid")["selected_by"] == "last epoch"
    _same_result(three_epochs, files / "no_valid")


def test_patience_stops_and_more_patience_continues(files, three_epochs, capsys):
    out = files / "patience"
    capsys.readouterr()
    assert _run(files, out, "--patience", "1") == 0
    m = _metrics(out)
    assert (m["epochs"], m["selected_epoch"], m["stopped_by_patience"]) == (2, 1, True)
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert "--patience stopped the run after epoch 2" in capsys.readouterr().err
    _same_result(out, files / "one")
    assert _run(files, out, "--patience", "1") == 0  # the same command: stopped, nothing more to train
    assert _metrics(out)["epochs"] == 2
    assert _run(files, out, "--patience", "5") == 0  # more patience: on to --epochs, as if never stopped
    m, full = _metrics(out), _metrics(three_epochs)
    assert m["epochs"] == 3 and not m["stopped_by_patience"]
    assert [h["valid_loss"] for h in m["history"]] == pytest.approx([h["valid_loss"] for h in full["history"]],
                                                                    rel=1e-12)
    capsys.readouterr()
    assert _run(files, files / "patience_at_the_end", "--patience", "1", epochs=2) == 0  # spent as --epochs ends
    assert not _metrics(files / "patience_at_the_end")["stopped_by_patience"]
    assert "--patience stopped" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", [("--density_warmup", "2"), ("--fast_after", "1")])
def test_epochs_before_the_final_form_are_not_candidates(files, flag):
    """Under --density_warmup 2 (one step an epoch) the first epoch changes fewer weights
    than asked for; under --fast_after 1 its model has the other form (every entry
    trainable): a lower validation loss there is not the result."""
    out = files / flag[0].strip("-")
    assert _run(files, out, *flag) == 0
    m = _metrics(out)
    losses = [h["valid_loss"] for h in m["history"]]
    assert losses[0] < losses[1] < losses[2]
    assert (m["selected_epoch"], m["best_valid_loss_epoch"]) == (2, 2)


def test_selection_flags_need_validation_frames(files, capsys, tmp_path):
    for bad, said in ((("--patience", "2"), "--patience acts on the validation loss: give --valid or --valid_fraction"),
                      (("--last_epoch",), "--last_epoch acts on the validation loss"),
                      (("--patience", "0", "--valid_fraction", "0.5"), "--patience must be >= 1 epochs, got 0")):
        assert _run(files, tmp_path / "refused", *bad, valid=False) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()


def test_a_result_worse_than_the_base_is_named(files, three_epochs, tmp_path, capsys):
    """metrics.json holds the base model's validation loss, the training loss's weights
    times its zero-shot mean squares, and whether the result's is above it; the CLI warns
    then. Here the validation labels are the base model's own: every epoch is worse."""
    m = _metrics(three_epochs)
    assert m["zero_shot_valid_loss"] < 1e-12 and m["valid_loss_above_zero_shot"] is True  # (labels in 8 decimals)
    capsys.readouterr()
    assert _run(files, three_epochs) == 0  # resumes at the end: the same verdict, said
    err = capsys.readouterr().err
    assert "warning: the result's validation loss (" in err and "epoch 1) is above the base model's" in err
    # the base model's validation errors (the curves' baseline), again the base's after the resume, not the result's
    m = _metrics(three_epochs)
    for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_A"):
        assert m[f"zero_shot_valid_{key}"] < 1e-4 < min(h["valid"][key] for h in m["history"])
    # validated on EMT's labels (those of the test frames), one epoch improves on the base
    out = tmp_path / "emt_valid"
    assert main(["finetune", "--model", str(files / "tiny.model"), "--train", str(files / "train.xyz"),
                 "--valid", str(files / "test.xyz"), "--method", "full", "--epochs", "1", "--out", str(out),
                 "--no_progress"]) == 0
    m = _metrics(out)
    assert m["evaluated_on"] == "valid" and m["valid_loss_above_zero_shot"] is False
    want = 1.0 * (m["zero_shot_valid_energy_rmse_mev_per_atom"] / 1e3) ** 2 + 100.0 * (
        m["zero_shot_valid_force_rmse_mev_per_A"] / 1e3) ** 2  # the default weights
    assert m["zero_shot_valid_loss"] == pytest.approx(want, rel=1e-12)
    assert m["history"][0]["valid_loss"] < m["zero_shot_valid_loss"]
    assert "is above the base model's" not in capsys.readouterr().err


def test_a_result_worse_than_the_base_is_named_without_validation(files, tmp_path, capsys, monkeypatch):
    """Without validation frames, the evaluated set's errors of the trained terms above the
    base model's and a diverged training loss are each named in metrics.json and a warning
    line (the exit code stays 0). Tested on the base model's own labels, with the energies
    weighed 0: the forces are worse, the energies are not trained. The training loss here
    is made to jump 1000x in the second epoch."""
    from sparsekern.finetune import trainer

    epoch = trainer._epoch
    monkeypatch.setattr(trainer, "_epoch", lambda loop, s, progress, bar: epoch(loop, s, progress, bar) * (
        1e3 if progress.epoch else 1))
    out = tmp_path / "worse"
    capsys.readouterr()
    assert _run(files, out, "--test", str(files / "valid.xyz"), "--energy_weight", "0", epochs=2, valid=False) == 0
    m, err = _metrics(out), capsys.readouterr().err
    assert m["worse_than_zero_shot"] == ["force_mae_mev_per_A"]
    assert m["test_energy_mae_mev_per_atom"] > m["zero_shot_test_energy_mae_mev_per_atom"]  # (untrained: unnamed)
    assert ("warning: fine-tuning made the test set's errors worse than the base model's (force_mae_mev_per_A "
            f"{m['zero_shot_test_force_mae_mev_per_A']:.4g} -> {m['test_force_mae_mev_per_A']:.4g}; zero-shot -> "
            "fine-tuned)") in err
    losses = [h["train_loss"] for h in m["history"]]
    assert m["training_loss_diverged"] == (f"epoch 2's mean training loss ({losses[1]:.4g}) is over 10x epoch 1's "
                                           f"({losses[0]:.4g})")
    assert f"warning: the training loss diverged: {m['training_loss_diverged']} (a lower --lr may help)" in err


def test_a_failed_export_leaves_no_lone_adapter_and_the_rerun_finishes(files, tmp_path, monkeypatch, capsys):
    """Writing the merged model failed after the adapter was written (a review: a SevenNet
    checkpoint of older names): the adapter went too, so the rerun of the same command
    resumes from the checkpoint and finishes (a lone adapter was taken for another run's)."""
    from sparsekern.integrations.mace.family import MaceFamily

    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise ValueError("export failed")

    with monkeypatch.context() as m:
        m.setattr(MaceFamily, "export", broken)
        assert _run(files, out, epochs=1, valid=False) == 2
    assert "export failed" in capsys.readouterr().err
    assert not (out / "adapter.safetensors").exists() and not (out / "metrics.json").exists()
    assert _run(files, out, epochs=1, valid=False) == 0
    assert (out / "adapter.safetensors").exists() and _metrics(out)["merged_model"]


def test_test_elements_the_training_lacks_keep_the_base_reference(files, tmp_path, capsys):
    """Test frames may hold an element the training frames lack (tune on one material,
    look at another): they are evaluated, their energies at the base's reference, and a
    warning names the element (it was refused)."""
    from ase.io import read, write

    train = read(files / "train.xyz", ":")
    for a in train:
        a.numbers[:] = 29  # Cu only (the labels stay: a smoke test of the split)
    write(tmp_path / "cu.xyz", train)
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(files / "tiny.model"), "--train", str(tmp_path / "cu.xyz"),
                 "--test", str(files / "test.xyz"), "--method", "sparse", "--epochs", "1", "--E0s", "foundation",
                 "--out", str(out), "--no_progress"]) == 0
    assert "test/validation frames hold atomic numbers [13] that no training frame holds" in capsys.readouterr().err
    m = _metrics(out)
    assert m["untrained_elements"] == [13] and m["test_energy_mae_mev_per_atom"] >= 0
