"""Settings of sparsity-promoting fine-tuning."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

from .methods import MODES


SEEDS = 2 ** 63  # seeds torch's generators take (an int64)


@dataclass
class SparseConfig:
    """density: target fraction of path weights that change (0.03 = 3 %).
    mode: one of ``methods.MODES``: "str" (element-wise soft threshold, the paper),
    "block" (group soft threshold over tiles) or "lora" (equivariant LoRA, the baseline).
    tile: (rows, cols) of a block in "block" mode, or "path" for whole path matrices.
    init_scale: std of the initial V relative to the std of the base weights.
    warmup_steps, peak_density, anneal_steps: the density schedule of thresholded modes
    (``density.scheduled_density``): none of the weights changes before the first step, so
    a prepared model is the base model; then the density rises linearly to peak_density
    (default: density) over warmup_steps training steps and falls to density over
    anneal_steps.
    element_resolved: the weights shared across elements (the irrep linears but the
    one-hot embedding) get one delta per element of the model, W[z] = W0 + dW[z], applied
    by the node's element. elements: the atomic numbers whose per-element deltas (those
    of the model's own per-element weights, such as MACE's contraction, and the
    element-resolved ones) can change (the training data's; None: all). The others
    start at exactly zero, get no gradient and stay zero, and density counts the rest:
    a foundation model of 89 elements tuned on 2 would otherwise spend its budget on
    entries no data reaches (random starts the threshold keeps, or, element-resolved, a
    dense update of the 2 elements' copies)."""

    density: float = 0.03
    mode: str = "str"
    tile: Union[Tuple[int, int], str] = (8, 8)
    init_scale: float = 1e-3
    lora_rank: int = 4
    lora_alpha: float = 1.0
    include_radial: bool = True
    seed: int = 0
    warmup_steps: int = 1
    peak_density: Optional[float] = None
    anneal_steps: int = 0
    element_resolved: bool = False
    elements: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SparseConfig: mode must be one of {tuple(MODES)}, got {self.mode!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"SparseConfig: density must be in (0, 1], got {self.density}")
        if not 0 <= self.seed < SEEDS:
            raise ValueError(f"SparseConfig: seed must be in [0, 2**63), got {self.seed}")
        if self.tile != "path":
            tile = tuple(self.tile)
            if len(tile) != 2 or min(tile) < 1:
                raise ValueError(f"SparseConfig: tile must be (rows, cols) >= 1 or 'path', got {self.tile!r}")
            self.tile = tile
        if self.peak_density is not None and not self.density <= self.peak_density <= 1.0:
            raise ValueError(f"SparseConfig: peak_density must be in [density, 1], got {self.peak_density}")
        if self.warmup_steps < 1 or self.anneal_steps < 0:
            raise ValueError(f"SparseConfig: need warmup_steps >= 1 and anneal_steps >= 0, "
                             f"got {self.warmup_steps} and {self.anneal_steps}")
        if self.lora_rank < 1:
            raise ValueError(f"SparseConfig: lora_rank must be >= 1, got {self.lora_rank}")
        if not (self.init_scale > 0 and math.isfinite(self.init_scale)):  # (NaN fails every comparison)
            raise ValueError(f"SparseConfig: init_scale must be finite and > 0, got {self.init_scale}")
        if self.element_resolved and MODES[self.mode].needs_loss:
            raise ValueError(f"SparseConfig: mode {self.mode!r} scores the shared weights, not one copy per "
                             "element: element_resolved needs str, block or lora")
        if self.elements is not None:
            self.elements = tuple(sorted({int(z) for z in self.elements}))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tile"] = list(self.tile) if self.tile != "path" else "path"
        d["elements"] = list(self.elements) if self.elements is not None else None
        if not self.element_resolved:  # what older sparsekern wrote
            del d["element_resolved"]
        if self.elements is None:
            del d["elements"]
        return d
