"""Sparsity-promoting fine-tuning (ICLR 2026, arXiv 2606.18691): frozen base weights,
a delta driven to exact zeros by a learned soft threshold."""

from .adapters import fingerprint, load_adapter, save_adapter
from .api import calibrate_density, iter_deltas, merge, prepare, stats, to_fast, unmerge
from .config import SparseConfig

__all__ = ["SparseConfig", "prepare", "stats", "save_adapter", "load_adapter", "merge", "unmerge",
           "to_fast", "calibrate_density", "fingerprint", "iter_deltas"]
