"""The Triton kernels of a fine-tuning run, compiled before its first step.

On a GPU each kernel specialisation compiles on its first launch, one after another:
about 70 s of MACE-MP-0 medium's first training step on the H200 machine (Triton 3.6).
:func:`sparsekern.precompile` compiles them all at once in parallel processes; the kernels
take node and edge counts unspecialised, so one batch covers every batch size. Used by
``sparsekern finetune`` (:func:`precompile_run`) and ``sparsekern mace-train``."""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import Callable, List

import torch

from ..ops import registry
from .backward import backward
from .distributed import Group
from .evaluation import Sample, forward, loss


def compiles_kernels(device) -> bool:
    """Whether the run launches compiled Triton kernels: a CUDA device, Triton there, and
    not its interpreter."""
    dev = torch.device(device)
    return (dev.type == "cuda" and registry.BACKENDS["triton"].available(dev)
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def precompile_on_copy(model: torch.nn.Module, passes: Callable[[torch.nn.Module], None], device,
                       say: bool = True) -> None:
    """Every Triton kernel that ``passes(copy of model)`` launches, compiled into Triton's
    cache. The launches are recorded, not run, so the copy ends as garbage; the random
    number generators are left as they were (the run's shuffles do not move). A failure
    costs only the time: it is said in one line and the kernels compile on first use,
    as without this."""
    from ..ops.triton.precompile import precompile

    dev = torch.device(device)
    scratch = copy.deepcopy(model)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        try:
            n = precompile(lambda: passes(scratch))
        except Exception as exc:  # noqa: BLE001 (any failure: the first launches compile instead)
            first = (str(exc).splitlines() or [""])[0]
            print(f"sparsekern: precompiling the Triton kernels failed ({type(exc).__name__}: {first}); "
                  "they compile on first use", file=sys.stderr)
            return
    if say:
        print(f"sparsekern: {n} Triton kernels compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def precompile_run(family, model: torch.nn.Module, batch: List[Sample], settings, group: Group) -> None:
    """``sparsekern finetune``'s kernels: a training step (forces in the loss) and an
    evaluation of ``batch``, compiled by rank 0 while the others wait."""
    if not compiles_kernels(settings.device):
        return
    if group.main:
        def passes(scratch):
            backward(loss(family, scratch, batch, settings), [p for p in scratch.parameters() if p.requires_grad])
            scratch.eval()
            forward(family, scratch, batch, settings.device, False)

        precompile_on_copy(model, passes, settings.device, say=settings.progress)
    group.barrier()
