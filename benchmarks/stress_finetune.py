"""Does ``--stress_weight`` train stresses? SevenNet-0 fine-tuned sparsely (3 %) to EMT's
Cu-Al (strained, rattled 32-atom fcc cells, EMT's energies, forces and stresses as the
labels), once per stress weight; the test errors before and after, stresses included.

    .venv-sevenn/bin/python benchmarks/stress_finetune.py [--weights 0 100 10000] [--epochs 4]

Writes results/stress_finetune_<date>.json (benchmarks/record.py) and prints a table."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record  # noqa: E402

KEYS = ("energy_mae_mev_per_atom", "force_mae_mev_per_A", "stress_mae_mev_per_A3")


def frames(n: int, seed: int):
    """``n`` EMT-labelled Cu-Al cells: 2x2x2 fcc Cu with a quarter Al at random sites,
    strained by up to 3 % (shear included) and rattled by 0.05 Å."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
        atoms.numbers[rng.choice(len(atoms), len(atoms) // 4, replace=False)] = 13
        strain = rng.uniform(-0.03, 0.03, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + (strain + strain.T) / 2), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info.update(REF_energy=atoms.get_potential_energy(), REF_stress=atoms.get_stress())
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        out.append(atoms)
    return out


def merged_stress_mae(model: str, test: Path) -> float:
    """The stress MAE (meV/Å^3) of the merged model file in SevenNet's own ASE calculator:
    for every run, whether its loss had stresses or not."""
    from ase.io import read
    from sevenn.calculator import SevenNetCalculator

    from ase.stress import voigt_6_to_full_3x3_stress

    calc = SevenNetCalculator(model=model, device="cpu")
    errors = []
    for atoms in read(test, ":"):  # over the 3x3 tensor, as the fine-tuning metrics (and MACE's)
        want = voigt_6_to_full_3x3_stress(atoms.info["REF_stress"])
        atoms.calc = calc
        errors.append(np.abs(atoms.get_stress(voigt=False) - want))
    return 1e3 * float(np.mean(errors))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 100.0, 10000.0], help="stress weights to run")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train", type=int, default=40, help="training frames")
    p.add_argument("--test", type=int, default=20, help="test frames")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.train < 1 or args.test < 1 or any(not w >= 0 for w in args.weights):
        p.error("--epochs, --train and --test must be >= 1 and every --weights >= 0")

    from ase.io import write

    from sparsekern.finetune.trainer import Settings, run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write(tmp / "train.xyz", frames(args.train, seed=0))
        write(tmp / "test.xyz", frames(args.test, seed=1))
        for weight in args.weights:
            t0 = time.perf_counter()
            m = run(Settings(model="7net-0", train=str(tmp / "train.xyz"), test=str(tmp / "test.xyz"),
                             method="sparse", out=str(tmp / f"w{weight:g}"), epochs=args.epochs,
                             stress_weight=weight, progress=False))
            rows.append({"stress_weight": weight, "wall_s": time.perf_counter() - t0,
                         **{f"zero_shot_{k}": m.get(f"zero_shot_test_{k}") for k in KEYS},
                         **{k: m.get(f"test_{k}") for k in KEYS},
                         "merged_stress_mae_mev_per_A3": merged_stress_mae(m["merged_model"], tmp / "test.xyz")})
    print("| stress weight | energy MAE (meV/atom) | force MAE (meV/Å) | stress MAE (meV/Å^3) | merged model's "
          "stress MAE in SevenNet's calculator |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[f'zero_shot_{k}']:.2f} -> {r[k]:.2f}" if r[k] is not None else "n/a" for k in KEYS]
        print(f"| {r['stress_weight']:g} | " + " | ".join(cells) + f" | {r['merged_stress_mae_mev_per_A3']:.2f} |")
    path = record.write("stress_finetune", {"command": " ".join(["benchmarks/stress_finetune.py", *sys.argv[1:]]),
                                            "args": vars(args), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
