"""The Triton kernels of a fine-tuning run, compiled before its first step.

On a GPU each kernel specialisation compiles on its first launch, one after another:
about 70 s of MACE-MP-0 medium's first training step on the H200 machine (Triton 3.6).
:func:`sparsekern.precompile` compiles them all at once in parallel processes; the kernels
take node and edge counts unspecialised, so one batch covers every batch size."""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import List

import torch

from ..ops import registry
from .distributed import Group
from .evaluation import Sample, forward, loss


def compiles_kernels(device: str) -> bool:
    """Whether the run launches compiled Triton kernels: a CUDA device, Triton there, and
    not its interpreter."""
    dev = torch.device(device)
    return (dev.type == "cuda" and registry.BACKENDS["triton"].available(dev)
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def precompile_run(family, model: torch.nn.Module, batch: List[Sample], settings, group: Group) -> None:
    """Every Triton kernel that a training step (forces in the loss) and an evaluation of
    ``batch`` launch, compiled into Triton's cache by rank 0 while the others wait. On a
    copy of the model: the launches are recorded, not run, so what the step leaves behind
    is garbage. A failure costs only the time: it is said in one line and the kernels
    compile on first use, as without this."""
    if not compiles_kernels(settings.device):
        return
    if group.main:
        from ..ops.triton.precompile import precompile

        scratch = copy.deepcopy(model)

        def run():
            loss(family, scratch, batch, settings).backward()
            scratch.eval()
            forward(family, scratch, batch, settings.device, False)

        t0 = time.perf_counter()
        try:
            n = precompile(run)
        except Exception as exc:  # noqa: BLE001 (any failure: the first launches compile instead)
            first = (str(exc).splitlines() or [""])[0]
            print(f"sparsekern: precompiling the Triton kernels failed ({type(exc).__name__}: {first}); "
                  "they compile on first use", file=sys.stderr)
        else:
            if settings.progress:
                print(f"sparsekern: {n} Triton kernels compiled in {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr)
        del scratch
    group.barrier()
