"""Moment labels of a frame: the input moments (from an xyz key, or ASE's initial
magnetic moments) and the magnetic-force labels, as (n, 3) arrays."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .graph import as_vectors


def read_moment_labels(atoms, where: str, magmom_key: str,
                       magforces_key: Optional[str]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(moments, magnetic forces or None) of ``atoms``; the moments also become its
    initial magnetic moments (what graphs and calculators read)."""
    moments = as_vectors(_array(atoms, magmom_key, where, "moments", "magmom"), len(atoms),
                         f"{where}: moments {magmom_key!r}")
    atoms.set_initial_magnetic_moments(moments)
    if magforces_key is None:
        return moments, None
    magforces = as_vectors(_array(atoms, magforces_key, where, "magnetic forces", "magforces"), len(atoms),
                           f"{where}: magnetic forces {magforces_key!r}")
    return moments, magforces


def _array(atoms, key: str, where: str, what: str, flag: str) -> np.ndarray:
    if key in atoms.arrays:
        return atoms.arrays[key]
    raise KeyError(f"{where}: no {what} under key {key!r} (use --{flag}_key to name it; "
                   f"array keys: {sorted(atoms.arrays)})")
