"""Freed CPU memory kept in the process for reuse, for training and MD on the CPU.

glibc's malloc gives a large block back to the operating system when it is freed: blocks
above a threshold (adapting up to 32 MiB) are mapped and unmapped one by one, and the
heap's top is trimmed. A training step frees its large tensors and allocates them again
the next step, and each page of a new mapping faults on first touch: 55,000 faults a
step for SevenNet-0 on four 63-atom silicon cells, 300,000 for MACE-MP-0 medium: an
eighth of the one step, a quarter of the other (benchmarks/cpu_step_ab.py;
benchmarks/NOTES.md). With the threshold above any tensor and no trimming, freed blocks
stay in the heap and the next step reuses them: the process keeps its peak memory until
it exits.

The trainer (``sparsekern finetune``, the demo) and ``sparsekern mace-train`` call
:func:`keep_freed_memory` when they run on the CPU; a script that runs a model on the
CPU many times (an ASE calculator in MD) can call it too.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # 32 MiB: the most older glibc accept
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in this process (once; later calls return
    the first answer). False, with nothing changed, where malloc is not glibc's or the
    environment already tunes it (MALLOC_*_, or glibc.malloc in GLIBC_TUNABLES)."""
    tuned = any(k in os.environ for k in _ENVIRONMENT) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    if platform.libc_ver()[0] != "glibc" or tuned:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # the mapping threshold first: setting either one ends glibc's adaptation, and a trim
    # threshold alone would leave every block above 128 KiB mapped (many more faults)
    if not any(mallopt(_M_MMAP_THRESHOLD, size) for size in _MMAP_THRESHOLDS):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
