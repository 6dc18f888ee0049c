"""Preemption-safe runs: SIGTERM or SIGINT during training writes a checkpoint at the
next step boundary (mid-epoch: the epoch and the steps done in it) and exits with 143 or
130 and one line saying how to resume; rerunning the same command finishes with the
uninterrupted run's results bit for bit (one process: same seed, same data order)."""

import os
import signal

import pytest
import torch

from sparsekern.cli import main
from sparsekern.finetune import trainer


def signal_before(monkeypatch, step: int, signum: int) -> None:
    """Deliver ``signum`` to this process just before training step ``step`` (from 1)."""
    original, count = trainer._step, [0]

    def step_after_signal(loop, batch, epoch):
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signum)
        return original(loop, batch, epoch)

    monkeypatch.setattr(trainer, "_step", step_after_signal)


@pytest.mark.parametrize("signum, step, stopped_at", [(signal.SIGTERM, 2, (0, 2)), (signal.SIGINT, 4, (1, 1))])
def test_signal_stops_at_the_step_boundary_and_the_rerun_finishes_as_uninterrupted(
        case, finetune_args, reference, result_difference, monkeypatch, capsys, tmp_path, signum, step, stopped_at):
    out = tmp_path / "run"
    signal_before(monkeypatch, step, signum)
    assert main(["finetune", *finetune_args(out)]) == 128 + signum
    err = capsys.readouterr().err
    epoch, steps = stopped_at
    assert err == (f"sparsekern finetune: stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step {steps}; "
                   f"checkpoint written to {out / 'checkpoint.pt'}; rerun the same command to resume\n")
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["step"], len(ck["history"])) == (epoch, steps, epoch)
    assert not (out / "metrics.json").exists() and not list(out.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    monkeypatch.undo()
    assert main(["finetune", *finetune_args(out)]) == 0
    assert result_difference(out, reference) == 0.0
