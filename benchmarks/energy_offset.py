"""How much of a fine-tuned model's energy error is one constant per atom? Reads the
merged models of benchmarks/accuracy.py's aspirin runs (its work directory) and prints,
per method, the mean signed energy error and the MAE before and after removing it.

    .venv-sevenn/bin/python benchmarks/energy_offset.py [--frames 100]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from ase.io import read


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sparsekern-accuracy" / "full")
    p.add_argument("--dataset", default="aspirin")
    p.add_argument("--frames", type=int, default=100)
    args = p.parse_args(argv)
    from sevenn.calculator import SevenNetCalculator

    frames = read(args.workdir / f"{args.dataset}_test.xyz", f":{args.frames}")
    for model in sorted((args.workdir / "runs").glob(f"{args.dataset}_train__*/merged_sevennet.pth")):
        calc = SevenNetCalculator(str(model), device="cpu")
        err = []
        for atoms in frames:
            atoms.calc = calc
            err.append((atoms.get_potential_energy() - atoms.info["REF_energy"]) / len(atoms))
        err = 1000 * np.array(err)
        print(f"{model.parent.name}: mean signed {err.mean():+.2f}, MAE {np.abs(err).mean():.2f}, "
              f"MAE without the mean {np.abs(err - err.mean()).mean():.2f} meV/atom ({len(err)} frames)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
