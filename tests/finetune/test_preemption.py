"""Preemption-safe runs: SIGTERM or SIGINT during training writes a checkpoint at the
next step boundary (mid-epoch: the epoch and the steps done in it) and exits with 143 or
130 and one line saying how to resume; rerunning the same command finishes with the
uninterrupted run's results bit for bit (one process: same seed, same data order)."""

import signal

import torch
from step_signals import signal_before

from sparsekern.cli import main


def _stopped(out, capsys, signum: int, epoch: int, steps: int) -> None:
    """The run stopped on ``signum`` after ``steps`` steps of epoch ``epoch + 1``: one
    line says so, the checkpoint holds that point, nothing else was written."""
    assert capsys.readouterr().err == (
        f"sparsekern finetune: stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step {steps}; "
        f"checkpoint written to {out / 'checkpoint.pt'}; rerun the same command to resume\n")
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["step"], len(ck["history"])) == (epoch, steps, epoch)
    assert not (out / "metrics.json").exists() and not list(out.glob(".*.tmp"))


def test_signals_stop_at_a_step_boundary_and_the_rerun_finishes_as_uninterrupted(
        finetune_args, reference, result_difference, monkeypatch, capsys, tmp_path):
    out, handlers = tmp_path / "run", [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    signal_before(monkeypatch.setattr, 2, signal.SIGTERM)  # mid-epoch 1 (3 steps per epoch)
    assert main(["finetune", *finetune_args(out)]) == 143
    _stopped(out, capsys, signal.SIGTERM, 0, 2)
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers  # put back
    monkeypatch.undo()
    signal_before(monkeypatch.setattr, 2, signal.SIGINT)  # the rerun's second step: epoch 2, step 1
    assert main(["finetune", *finetune_args(out)]) == 130
    _stopped(out, capsys, signal.SIGINT, 1, 1)
    monkeypatch.undo()
    assert main(["finetune", *finetune_args(out)]) == 0
    assert result_difference(out, reference) == 0.0


def test_a_signal_after_the_last_step_stops_the_run_too(finetune_args, reference, result_difference, monkeypatch,
                                                        capsys, tmp_path):
    """SIGTERM while the last epoch's checkpoint is written (after the last step: no step
    checks it) stops the run with its code, not dropped; the rerun finishes as uninterrupted."""
    import os

    from sparsekern.finetune import checkpoint

    out, save = tmp_path / "run", checkpoint.save

    def save_then_signal(out_, identity, model, optimizer, progress, *a):
        save(out_, identity, model, optimizer, progress, *a)
        if progress.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "save", save_then_signal)
    assert main(["finetune", *finetune_args(out)]) == 143
    assert capsys.readouterr().err == (f"sparsekern finetune: stopped by SIGTERM at the end of epoch 2; checkpoint "
                                       f"written to {out / 'checkpoint.pt'}; rerun the same command to resume\n")
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    assert main(["finetune", *finetune_args(out)]) == 0
    assert result_difference(out, reference) == 0.0
