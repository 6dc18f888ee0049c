"""Sparsity-promoting fine-tuning (ICLR 2026, arXiv 2606.18691): frozen base weights,
a delta driven to exact zeros by a learned soft threshold."""

from ..delta_slot import iter_deltas
from .adapters import fingerprint, load_adapter, save_adapter
from .config import SparseConfig
from .density import calibrate_density
from .lifecycle import merge, prepare, to_fast, unmerge
from .statistics import stats

__all__ = ["SparseConfig", "prepare", "stats", "save_adapter", "load_adapter", "merge", "unmerge",
           "to_fast", "calibrate_density", "fingerprint", "iter_deltas"]
