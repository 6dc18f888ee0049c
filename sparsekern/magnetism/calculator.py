"""An ASE calculator: a family's calculator (the merged base model) plus the magnetic
modules. Moments in: ``atoms``' initial magnetic moments; out: energy, forces and (cells
periodic in 3 directions) stress with E_mag's, ``magforces`` (-dE/dm, eV/μB) and, with a
moment head, the predicted moments (``atoms.get_magnetic_moments()``, along the input
moments' directions). Collinear input (scalars, moments along z) gives signed scalars for
both, the component along the moments (without spin-orbit terms, which refuse collinear
moments, -dE/dm has no other)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .graph import collate, magnetic_graph
from .labels import check_spin_axis
from .moments import oriented


class MagneticCalculator(Calculator):
    def __init__(self, base, energy, head=None, **kwargs):
        self.base, self.energy, self.head = base, energy.eval(), head  # (before Calculator's reset: ours reads base)
        super().__init__(**kwargs)
        self.implemented_properties = ["energy", "free_energy", "forces", "stress", "magforces"] + (
            ["magmoms", "magmom"] if head is not None else [])

    def reset(self):
        super().reset()
        self.base.reset()  # (its results are of the same atoms: an adapter swap must drop them too)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        collinear = self.atoms.get_initial_magnetic_moments().ndim == 1
        if not self.atoms.get_initial_magnetic_moments().any():
            warnings.warn("MagneticCalculator: the atoms' initial magnetic moments are all 0, where the magnetic "
                          "energy vanishes: this is the base model's energy (set the moments with "
                          "atoms.set_initial_magnetic_moments)", stacklevel=2)
        if self.energy.spin_orbit:
            check_spin_axis(self.atoms.get_initial_magnetic_moments(), "MagneticCalculator: the initial moments")
        plain = self.atoms.copy()
        plain.calc = self.base
        device = self.energy.embed.weight.device
        batch = collate([magnetic_graph(self.atoms, self.energy.cutoff)], device)
        stress = "stress" in properties
        if stress and not self.atoms.pbc.all():
            raise PropertyNotImplementedError("stress: the cell is not periodic in 3 directions")
        mag = {k: t.detach().cpu().double().numpy() for k, t in self.energy.outputs(batch, stress=stress).items()}
        energy = plain.get_potential_energy() + float(mag["energy"][0])
        self.results = {"energy": energy, "free_energy": energy, "forces": plain.get_forces() + mag["forces"],
                        "magforces": mag["magforces"][:, 2] if collinear else mag["magforces"]}
        if stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(plain.get_stress(voigt=False) + mag["stress"][0])
        if self.head is not None:
            moments = oriented(self.head(self.energy, batch), batch.moments).detach().cpu().double().numpy()
            self.results["magmoms"] = moments[:, 2] if collinear else moments
            total = moments.sum(0)
            self.results["magmom"] = float(total[2]) if collinear else float(np.linalg.norm(total))


def load_calculator(path, device: str = "cpu", modal: Optional[str] = None) -> MagneticCalculator:
    """The calculator of a merged model written by a magnetic fine-tuning run (the
    family's model file; its magnetic modules beside it), at fidelity ``modal`` for a
    model of several (the run's --modal / --head)."""
    from ..integrations import computing_at, family_for
    from .family import MagneticFamily

    if not Path(path).is_file():
        raise FileNotFoundError(f"load_calculator: no model file at {path}")
    family = computing_at(family_for(str(path), "load_calculator:"), str(path), modal, "load_calculator: modal")
    return MagneticFamily(family).calculator(path, device)
