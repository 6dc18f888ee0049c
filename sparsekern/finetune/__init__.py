"""Sparsity-promoting fine-tuning (ICLR 2026, arXiv 2606.18691): frozen base weights,
a delta driven to exact zeros by a learned soft threshold."""

from ..delta_slot import iter_deltas
from .adapter_set import (adapter_calculator, delete_adapter, disable_adapter, list_adapters, load_adapter,
                          set_adapter)
from .adapters import fingerprint, save_adapter
from .config import SparseConfig
from .density import calibrate_density
from .lifecycle import merge, prepare, to_fast, unmerge
from .statistics import stats

__all__ = ["SparseConfig", "prepare", "stats", "save_adapter", "load_adapter", "merge", "unmerge",
           "to_fast", "calibrate_density", "fingerprint", "iter_deltas", "set_adapter", "disable_adapter",
           "delete_adapter", "list_adapters", "adapter_calculator"]
