"""The layout the Triton kernels read node features in: component-major.

e3nn lays an irrep block out channel-major (column off + u * d + i holds channel u's
component i), so a tile of 32 channels of one component is 32 floats d apart: a warp's
load touches up to 32 sectors of 32 bytes for 128 useful bytes. The kernels read a
component-major copy instead (column off + i * mul + u), where that tile is one contiguous
128-byte run. The copy is one ``index_select`` of the features, a small fraction of the
bytes the kernels then read from it; outputs keep e3nn's layout.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch


def permutation(spans: Iterable[Tuple[int, int, int]], width: int, device) -> Optional[torch.Tensor]:
    """The columns of the component-major copy of features ``width`` wide: for each
    block (offset, d, mul) of ``spans``, column off + i * mul + u is off + u * d + i; other
    columns stay. None where that is every column's own (all blocks scalars)."""
    perm = list(range(width))
    for off, d, mul in spans:
        for i in range(d):
            perm[off + i * mul:off + (i + 1) * mul] = range(off + i, off + mul * d, d)
    return None if perm == list(range(width)) else torch.tensor(perm, device=device)


def component_major(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """x's columns in the kernels' order (:func:`permutation`): one copy, or x itself."""
    return x if perm is None else x.index_select(1, perm)
