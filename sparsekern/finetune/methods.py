"""The fine-tuning methods and delta modes, in one table: configuration checks, the
command lines' choices and help, the default learning rates and the adapter formats
are all read from here, so a new method or mode is added in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

from .delta import FixedDelta, LoRADelta, ThresholdDelta

SPARSE_ADAPTER = "sparsekern-adapter"  # the active delta entries (index, values)
LORA_ADAPTER = "sparsekern-lora-adapter"  # the LoRA factors, not their dense product


@dataclass(frozen=True)
class Mode:
    """How a delta is made (``SparseConfig.mode``)."""

    name: str
    help: str
    steered: bool  # a density controller holds the fraction of changed weights on target
    adapter: str  # the adapter format its deltas are saved in
    delta_types: Tuple[type, ...]  # the delta classes it attaches (FixedDelta: fast mode, loaded adapters)
    needs_loss: bool = False  # chooses its entries from the training loss (prepare's ``losses``)


@dataclass(frozen=True)
class Method:
    """What the fine-tuning harness trains (``--method``)."""

    name: str
    help: str
    lr: float  # the default learning rate of Adam
    modes: Tuple[str, ...]  # the delta modes it trains; none: the base weights themselves


_THRESHOLDED = (ThresholdDelta, FixedDelta)
MODES = {m.name: m for m in (
    Mode("str", "element-wise soft threshold (the paper)", True, SPARSE_ADAPTER, _THRESHOLDED),
    Mode("block", "group soft threshold over tiles, so kernels can skip inactive blocks", True,
         SPARSE_ADAPTER, _THRESHOLDED),
    Mode("saliency", "the entries with the largest squared loss gradient at the base (Fisher), "
         "trained from zero on a fixed mask", False, SPARSE_ADAPTER, (FixedDelta,), needs_loss=True),
    Mode("lora", "equivariant LoRA (the baseline): rank lora_rank per path block", False,
         LORA_ADAPTER, (LoRADelta,)),
)}

# Adam moves every trainable entry by about lr per step whatever its gradient's scale;
# a delta that changes a few % of the weights, or a rank-4 factor, needs larger moves
# per entry than full fine-tuning makes on all of them. Chosen on a validation split
# (benchmarks/lr_sweep.py; results in benchmarks/results/lr_sweep_*).
METHODS = {m.name: m for m in (
    Method("sparse", "a sparse delta on the frozen base (a few % of the path weights change)", 1e-1,
           ("str", "block", "saliency")),
    Method("full", "every base weight trainable", 3e-3, ()),
    Method("lora", "equivariant LoRA on the frozen base", 1e-1, ("lora",)),
)}
DEFAULT_LR = {name: METHODS[name].lr for name in sorted(METHODS)}  # sorted, as reports print it

# A sparse delta at lower density needs larger moves per entry: on aspirin (SevenNet-0,
# 10 epochs, benchmarks/results/density005_candidates_2026-12-03.md) lr 0.3 beat 0.1 at
# 0.5 % (64.9 vs 71.9 meV/A force MAE) and lost at 3 % (58.7 vs 54.9). With the moving
# average of the parameters (the default) a step's noise is averaged away: 0.6 beat 0.3
# at 0.5 %, and 0.2 beat 0.1 at 3 %, on three seeds of aspirin, 3BPA and silicon
# (benchmarks/NOTES.md, seventh and eighth rounds). Keyed by whether the average is
# evaluated (False: --no_ema, the last step).
SPARSE_LR_AT = {True: ((0.005, 0.6), (0.03, 0.2)), False: ((0.005, 0.3), (0.03, 0.1))}


def default_lr(method: str, density: float, sparse_lr_at=SPARSE_LR_AT[True]) -> float:
    """Adam's default learning rate; a sparse delta's follows its density: the
    measured lr (``sparse_lr_at``: two (density, lr) pairs) at or beyond the two
    measured densities, log-log interpolated between (checked at 1 % on aspirin: the
    best of 0.2, 0.39 and 0.6 with the average; NOTES.md, ninth round)."""
    if method != "sparse":
        return METHODS[method].lr
    (d0, lr0), (d1, lr1) = sparse_lr_at
    t = min(max(math.log(density / d0) / math.log(d1 / d0), 0.0), 1.0)
    return lr0 * (lr1 / lr0) ** t


SPARSE_MODES = METHODS["sparse"].modes  # what --mode / --sparse_mode offer


def adapter_format(delta) -> str:
    """The adapter format ``delta`` is saved in: its mode's."""
    return next(m.adapter for m in MODES.values() if isinstance(delta, m.delta_types))


def choices_help(table: dict, names=None) -> str:
    """'name: help; ...' of ``table``'s rows (all, or ``names``), for an argparse help
    (which reads % as a format)."""
    return "; ".join(f"{n}: {table[n].help}" for n in (names or table)).replace("%", "%%")
