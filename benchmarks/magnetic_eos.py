"""The magnetic energy's volume dependence (not CI): E_mag fitted in closed form
(magnetism/fit.py) on FCC Fe frames that all share one cell, beside SevenNet-0 as the
base, with the strain prior (its rows at the energies' weight, as the trainer fits it)
and without (weight 0); then E_mag per atom of a test frame whose cell is scaled by 0.98 to
1.02 (nothing in the data constrains it), the test energy MAE (the mean offset removed:
the E0 refit owns it) and the magnetic-force MAE. Writes
benchmarks/results/magnetic_eos_<date>.json and prints a table.

    .venv-sevenn/bin/python benchmarks/magnetic_eos.py [--n_train 4] [--n_test 8]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import record  # benchmarks/record.py
from magnetism import split  # benchmarks/magnetism.py

SCALES = (0.98, 0.99, 1.0, 1.01, 1.02)
WEIGHTS = {"energy": 1e4, "forces": 100.0, "magforces": 100.0}  # benchmarks/magnetism.py's


def residual_parts(module, base, frames):
    """The fit's inputs: one frame a batch, its energy and force residuals of the base and magnetic forces."""
    from sparsekern.magnetism.graph import collate, magnetic_graph

    parts = []
    for k, a in enumerate(frames):
        plain = a.copy()
        plain.calc = base
        targets = {"energy": torch.tensor([a.info["REF_energy"] - plain.get_potential_energy()]),
                   "forces": torch.as_tensor(a.arrays["REF_forces"] - plain.get_forces()),
                   "magforces": torch.as_tensor(a.arrays["REF_magforces"])}
        parts.append((collate([magnetic_graph(a, module.cutoff, a.arrays["REF_magmom"])], "cpu"), targets, k, {}))
    return parts


def measure(base, train, test, strain_weight: float) -> dict:
    from sparsekern.magnetism.energy import MagneticEnergy
    from sparsekern.magnetism.fit import STRAINS, normal_equations, solve
    from sparsekern.magnetism.graph import collate, magnetic_graph

    torch.manual_seed(0)
    module = MagneticEnergy().double()
    natoms = sum(len(a) for a in train)
    counts = {"energy": len(train), "forces": 3 * natoms, "magforces": 3 * natoms, "strain": len(STRAINS) * len(train)}
    fit = solve(module, normal_equations(module, residual_parts(module, base, train), counts),
                {**WEIGHTS, "strain": strain_weight * WEIGHTS["energy"]})

    def outputs(a, scale=1.0):
        b = a.copy()
        b.set_cell(a.cell * scale, scale_atoms=True)
        out = module.outputs(collate([magnetic_graph(b, module.cutoff, a.arrays["REF_magmom"])], "cpu"))
        return float(out["energy"][0]) / len(a), out["magforces"].detach().numpy()

    eos = [1e3 * outputs(test[0], s)[0] for s in SCALES]
    errors, magforce_errors = [], []
    for a, part in zip(test, residual_parts(module, base, test)):
        e, magforces = outputs(a)
        errors.append(float(part[1]["energy"][0]) / len(a) - e)
        magforce_errors.append(np.abs(a.arrays["REF_magforces"] - magforces).mean())
    errors = np.array(errors)
    return {"strain_weight": strain_weight, "fit": fit, "b": float(module.onsite[-1].bias[1]),
            "e_mag_mev_per_atom_by_scale": dict(zip(map(str, SCALES), eos)),
            "e_mag_range_mev_per_atom": max(eos) - min(eos),
            "test_energy_mae_mev_per_atom": 1e3 * float(np.abs(errors - errors.mean()).mean()),
            "test_magforce_mae_mev_per_muB": 1e3 * float(np.mean(magforce_errors))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_train", type=int, default=4, help="frames per DFT iteration (1, 2, 3) to fit on")
    p.add_argument("--n_test", type=int, default=8)
    args = p.parse_args()
    from sevenn.calculator import SevenNetCalculator

    base = SevenNetCalculator("7net-0", device="cpu")
    train, test = split("fe", args.n_train, args.n_test)
    rows = [measure(base, train, test, w) for w in (0.0, 1.0)]
    path = record.write("magnetic_eos", {"command": f"benchmarks/magnetic_eos.py --n_train {args.n_train} "
                                                   f"--n_test {args.n_test}", "train_frames": len(train),
                                         "test_frames": len(test), "rows": rows})
    print("strain prior  E_mag (meV/atom) at cell scale " + " ".join(map(str, SCALES))
          + "  range  test E MAE (meV/atom)  magforce MAE (meV/μB)  b")
    for r in rows:
        print(f"{'on ' if r['strain_weight'] else 'off'}  " + " ".join(
            f"{v:8.1f}" for v in r["e_mag_mev_per_atom_by_scale"].values())
            + f"  {r['e_mag_range_mev_per_atom']:6.1f}  {r['test_energy_mae_mev_per_atom']:.3f}"
            f"  {r['test_magforce_mae_mev_per_muB']:.2f}  {r['b']:.3g}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
