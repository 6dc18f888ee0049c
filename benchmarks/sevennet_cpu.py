"""SevenNet-0 patched vs not on CPU: energies, forces (through SevenNetCalculator) and the
best-of-3 time of each, on a few real structures; the rows also go to
benchmarks/results/sevennet_cpu_<date>.json (a day's later runs ``_2``, ``_3``...).

    .venv-sevenn/bin/python benchmarks/sevennet_cpu.py
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase.io import read

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import record  # noqa: E402  (benchmarks/record.py)

import sparsekern  # noqa: E402
from sparsekern.locations import data_dir  # noqa: E402
from sparsekern.integrations.sevennet.models import load_sevennet  # noqa: E402

STRUCTURES = [("si_mlearn/Si_test.xyz", 0), ("si_mlearn/Si_test.xyz", 10), ("nio_spin/NiO_data_2.xyz", 0),
              ("rmd17/revised_aspirin/test.xyz", 0), ("gst/gst_frames_000_099.xyz", 0)]


def _timed(atoms, calc, repeats: int = 3):
    """Energy and forces, with the best of ``repeats`` timings after one warm-up."""
    atoms = atoms.copy()
    atoms.calc = calc
    best = float("inf")
    for _ in range(repeats + 1):
        calc.results = {}
        start = time.perf_counter()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        best = min(best, time.perf_counter() - start)
    return energy, forces, best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="7net-0")
    args = parser.parse_args(argv)
    from sevenn.calculator import SevenNetCalculator

    base = load_sevennet(args.model)
    patched = sparsekern.patch(copy.deepcopy(base), verbose=True)
    calcs = [SevenNetCalculator(model=m, device="cpu") for m in (base, patched)]
    print(f"\n{'structure':<38}{'atoms':>6}{'E e3nn (eV)':>14}{'E sparsekern':>14}{'max|dF| (eV/A)':>16}"
          f"{'t e3nn (s)':>12}{'t ours (s)':>12}{'e3nn/ours':>11}")
    rows = []
    for rel, index in STRUCTURES:
        path = data_dir() / rel
        if not path.exists():
            print(f"{rel}: missing ({path}); set SPARSEKERN_DATA to the data folder")
            continue
        atoms = read(path, index=index)
        (e0, f0, t0), (e1, f1, t1) = (_timed(atoms, c) for c in calcs)
        rows.append({"structure": f"{rel}[{index}]", "atoms": len(atoms), "energy_e3nn": float(e0), "energy_ours": float(e1),
                     "max_force_diff": float(np.abs(f1 - f0).max()), "e3nn_s": t0, "sparsekern_s": t1,
                     "speedup": t0 / t1})
        print(f"{rel + f'[{index}]':<38}{len(atoms):>6}{e0:>14.6f}{e1:>14.6f}{np.abs(f1 - f0).max():>16.2e}"
              f"{t0:>12.4f}{t1:>12.4f}{t0 / t1:>10.2f}x")
    if rows:
        out = record.write("sevennet_cpu", {
            "benchmark": f"{args.model} energy+forces through SevenNetCalculator, float32, best of 3 after a warm-up",
            "command": f"python benchmarks/sevennet_cpu.py --model {args.model}",
            "threads": torch.get_num_threads(), "rows": rows})
        print(f"load average {os.getloadavg()}; wrote {out}")


if __name__ == "__main__":
    main()
