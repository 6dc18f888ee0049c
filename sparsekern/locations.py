"""Where real data and trained models live: beside the project, not in it
(``SPARSEKERN_DATA``, ``SPARSEKERN_MODELS``)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Real data sets live beside the project, not in it (SPARSEKERN_DATA)."""
    return Path(os.environ.get("SPARSEKERN_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def models_dir() -> Path:
    return Path(os.environ.get("SPARSEKERN_MODELS", data_dir().parent / "models"))
