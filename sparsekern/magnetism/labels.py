"""Moment labels of a frame: the input moments (from an xyz key, or ASE's initial
magnetic moments) and the magnetic-force labels, as (n, 3) arrays. Collinear magnetic
forces label the component along the moments' axis only: the others are NaN (not
labelled), which the loss, the errors and the magnetic fit leave out."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .graph import AXIS, as_vectors


def read_moment_labels(atoms, where: str, magmom_key: str, magforces_key: Optional[str],
                       spin_orbit: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(moments, magnetic forces or None) of ``atoms``; the moments also become its
    initial magnetic moments (what graphs and calculators read). ``spin_orbit``: E_mag
    has spin-orbit terms, which need 3-vector moments (:func:`check_spin_axis`)."""
    raw = _array(atoms, magmom_key, where, "moments", "magmom")
    if spin_orbit:
        check_spin_axis(raw, f"{where}: moments {magmom_key!r}")
    moments = as_vectors(raw, len(atoms), f"{where}: moments {magmom_key!r}")
    atoms.arrays.pop("initial_magmoms", None)  # a collinear column there would refuse 3-vectors
    atoms.set_initial_magnetic_moments(moments)
    if magforces_key is None:
        return moments, None
    raw_forces = _array(atoms, magforces_key, where, "magnetic forces", "magforces")
    magforces = as_vectors(raw_forces, len(atoms), f"{where}: magnetic forces {magforces_key!r}")
    if np.ndim(raw_forces) == 1:
        if np.ndim(raw) == 2:
            raise ValueError(f"{where}: magnetic forces {magforces_key!r} are collinear scalars but moments "
                             f"{magmom_key!r} are 3-vectors: give the magnetic forces as 3-vectors (n, 3)")
        # a collinear calculation gives -dE/dm along the moments only: the transverse
        # components are unknown, not 0 (with spin-orbit coupling the model's are not 0)
        magforces[:, AXIS == 0] = np.nan
    return moments, magforces


def check_spin_axis(moments, what: str) -> None:
    """Refuse collinear moments (scalars) for a module with spin-orbit terms: a collinear
    calculation has no spin-orbit coupling and its moments no direction in the crystal,
    so those terms would be fitted to the lab's z axis (the energy would then change when
    the crystal is rotated under the same collinear moments). No moments at all (ASE's
    zeros) are no magnetism, not collinear moments."""
    if np.ndim(moments) == 1 and np.any(moments):
        raise ValueError(f"{what} are collinear scalars, but --spin_orbit's terms couple the moments' directions "
                         f"to the lattice: give 3-vector moments (n, 3) from a non-collinear calculation")


def _array(atoms, key: str, where: str, what: str, flag: str) -> np.ndarray:
    """``atoms.arrays[key]``, or the calculator's result ``key``: ASE's extended-XYZ reader
    moves per-atom columns named like calculator results (``magmoms``) there."""
    if key in atoms.arrays:
        return atoms.arrays[key]
    results = getattr(atoms.calc, "results", {})
    if key in results:
        return results[key]
    raise KeyError(f"{where}: no {what} under key {key!r} (use --{flag}_key to name it; "
                   f"array keys: {sorted(atoms.arrays)}, calculator results: {sorted(results)})")
