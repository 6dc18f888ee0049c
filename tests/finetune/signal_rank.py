"""Run by test_distributed.py under torchrun: ``signal_rank.py RANK STEP finetune ...``
runs ``sparsekern finetune ...`` where only rank RANK receives SIGTERM, just before
training step STEP; each rank then prints how many steps it took and its exit code."""

import os
import signal
import sys

import torch.distributed as dist

import sparsekern  # noqa: F401  (first: lets e3nn 0.4.4 import under torch >= 2.6)
from sparsekern.cli import main
from sparsekern.finetune import trainer

rank, step = int(sys.argv[1]), int(sys.argv[2])
original, steps = trainer._step, [0]


def step_after_signal(loop, batch, epoch):
    steps[0] += 1
    if steps[0] == step and dist.get_rank() == rank:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(loop, batch, epoch)


trainer._step = step_after_signal
code = main(sys.argv[3:])
print(f"rank {os.environ['RANK']}: {steps[0]} steps, exit {code}", file=sys.stderr)
sys.exit(code)
