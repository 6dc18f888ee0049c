"""A signal delivered just before a chosen training step, for the preemption and
distributed tests. As a script under torchrun (test_distributed.py),
``step_signals.py RANK STEP finetune ...`` runs ``sparsekern finetune ...`` where only
rank RANK receives SIGTERM, before step STEP; each rank then prints how many steps it
took and its exit code."""

import os
import signal
import sys

import sparsekern  # noqa: F401  (first: lets e3nn 0.4.4 import under torch >= 2.6)
from sparsekern.finetune import trainer


def signal_before(set_attribute, step: int, signum: int) -> list:
    """Deliver ``signum`` to this process just before training step ``step`` (from 1;
    0: never), wrapping the trainer's step with ``set_attribute`` (``setattr`` or
    pytest's ``monkeypatch.setattr``). Returns the step counter, a list of one int."""
    original, count = trainer._step, [0]

    def step_after_signal(loop, batch, epoch):
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), signum)
        return original(loop, batch, epoch)

    set_attribute(trainer, "_step", step_after_signal)
    return count


if __name__ == "__main__":
    from sparsekern.cli import main

    rank, step = os.environ["RANK"], int(sys.argv[2])
    count = signal_before(setattr, step if rank == sys.argv[1] else 0, signal.SIGTERM)
    code = main(sys.argv[3:])
    print(f"rank {rank}: {count[0]} steps, exit {code}", file=sys.stderr)
    sys.exit(code)
