"""The magnetic energy's volume dependence (not CI): E_mag fitted in closed form
(magnetism/fit.py) on FCC Fe frames that all share one cell, beside SevenNet-0 as the
base, with the strain prior (as the trainer fits it: the frames' moments and the
ferromagnetic order, by default at ``prior_weight`` of the loss weights, ``--priors``: at
these multiples of their largest) and without (0); then
E_mag per atom of a test frame whose cell is scaled by 0.98 to 1.02 (nothing in the data
constrains it), with the data's moments, all parallel (ferromagnetic) and in alternating
(001) layers (layered antiferromagnetic), the test energy MAE (the mean offset removed: the
E0 refit owns it) and the magnetic-force MAE. The loss weights are ``sparsekern finetune``'s
defaults (energies 1, forces and magnetic forces 100) unless ``--energy_weight`` says otherwise.
Writes benchmarks/results/magnetic_eos_<date>.json and prints a table.

    .venv-sevenn/bin/python benchmarks/magnetic_eos.py [--n_train 4] [--n_test 8] [--energy_weight 1] [--priors 0 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import record  # benchmarks/record.py
from magnetism import split  # benchmarks/magnetism.py

SCALES = (0.98, 0.99, 1.0, 1.01, 1.02)


def orders(atoms) -> dict:
    """The moments of ``atoms`` (an FCC cell): the data's, all along z with their lengths, and
    in alternating (001) layers (half an FCC lattice constant apart)."""
    m = atoms.arrays["REF_magmom"]
    length = np.linalg.norm(m, axis=1) if m.ndim == 2 else np.abs(m)
    spacing = (4 * atoms.get_volume() / len(atoms)) ** (1 / 3) / 2
    layer = np.round(atoms.positions[:, 2] / spacing).astype(int) % 2
    return {"data": m, "ferromagnetic": length[:, None] * [0, 0, 1],
            "layered_afm": (length * np.where(layer == 0, 1, -1))[:, None] * [0, 0, 1]}


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


def measure(base, train, test, weights: dict, prior: float) -> dict:
    from sparsekern.magnetism.energy import MagneticEnergy
    from sparsekern.magnetism.fit import PRIOR, normal_equations, prior_rows, prior_weight, solve
    from sparsekern.magnetism.graph import collate, magnetic_graph

    torch.manual_seed(0)
    module = MagneticEnergy().double()
    natoms = sum(len(a) for a in train)
    counts = {"energy": len(train), "forces": 3 * natoms, "magforces": 3 * natoms, "strain": prior_rows(len(train))}
    weights = {**weights, "strain": prior / PRIOR * prior_weight(weights)}
    fit = solve(module, normal_equations(module, residual_parts(module, base, train), counts), weights)

    def outputs(a, scale=1.0, moments=None):
        b = a.copy()
        b.set_cell(a.cell * scale, scale_atoms=True)
        m = a.arrays["REF_magmom"] if moments is None else moments
        out = module.outputs(collate([magnetic_graph(b, module.cutoff, m)], "cpu"))
        return float(out["energy"][0]) / len(a), out["magforces"].detach().numpy()

    eos = {name: [1e3 * outputs(test[0], s, m)[0] for s in SCALES] for name, m in orders(test[0]).items()}
    errors, magforce_errors = [], []
    for a, part in zip(test, residual_parts(module, base, test)):
        e, magforces = outputs(a)
        errors.append(float(part[1]["energy"][0]) / len(a) - e)
        magforce_errors.append(np.abs(a.arrays["REF_magforces"] - magforces).mean())
    errors = np.array(errors)
    return {"prior": prior, "weights": weights, "fit": fit, "b": float(module.onsite[-1].bias[1]),
            "e_mag_mev_per_atom_by_scale": {k: dict(zip(map(str, SCALES), v)) for k, v in eos.items()},
            "e_mag_range_mev_per_atom": {k: max(v) - min(v) for k, v in eos.items()},
            "test_energy_mae_mev_per_atom": 1e3 * float(np.abs(errors - errors.mean()).mean()),
            "test_magforce_mae_mev_per_muB": 1e3 * float(np.mean(magforce_errors))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_train", type=int, default=4, help="frames per DFT iteration (1, 2, 3) to fit on")
    p.add_argument("--n_test", type=int, default=8)
    p.add_argument("--energy_weight", type=float, default=1.0, help="(finetune's default)")
    p.add_argument("--priors", type=float, nargs="+", default=[0.0, 1.0],
                   help="the prior's weights over the largest term weight, one fit each (the trainer's: fit.PRIOR)")
    args = p.parse_args()
    from sevenn.calculator import SevenNetCalculator

    base = SevenNetCalculator("7net-0", device="cpu")
    train, test = split("fe", args.n_train, args.n_test)
    weights = {"energy": args.energy_weight, "forces": 100.0, "magforces": 100.0}
    rows = [measure(base, train, test, weights, prior) for prior in args.priors]
    path = record.write("magnetic_eos", {"command": f"benchmarks/magnetic_eos.py --n_train {args.n_train} "
                                                   f"--n_test {args.n_test} --energy_weight {args.energy_weight} "
                                                   f"--priors {' '.join(map(str, args.priors))}",
                                         "train_frames": len(train), "test_frames": len(test), "rows": rows})
    print("prior  moments        E_mag (meV/atom) at cell scale " + " ".join(map(str, SCALES))
          + "  range  test E MAE (meV/atom)  magforce MAE (meV/μB)  b")
    for r in rows:
        for name, by_scale in r["e_mag_mev_per_atom_by_scale"].items():
            print(f"{r['prior']:5g}  {name:14s} " + " ".join(f"{v:8.1f}" for v in by_scale.values())
                  + f"  {r['e_mag_range_mev_per_atom'][name]:7.1f}  {r['test_energy_mae_mev_per_atom']:.3f}"
                  f"  {r['test_magforce_mae_mev_per_muB']:.2f}  {r['b']:.3g}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
