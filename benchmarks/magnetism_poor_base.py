"""The magnetic fit on a poor base (not CI): the tiny MACE model and the unseen fcc Ni
data of tests/magnetism/test_magnetic_finetune.py (EMT energies plus a Heisenberg
model; collinear moments, and 3-vectors with a Dzyaloshinskii-Moriya term and magnetic
forces), through ``sparsekern finetune`` at two force weights. The base's force errors
(about 240 meV/Å) are not magnetic: how much of them E_mag takes on, and what that does
to the energies, is what this shows (benchmarks/NOTES.md, magnetism).

    .venv-mace/bin/python benchmarks/magnetism_poor_base.py [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "magnetism")]

import conftest  # noqa: E402,F401  (the tests' environment: TRITON_INTERPRET before triton)
import test_magnetic_finetune as cases  # noqa: E402

FLAGS = {"collinear": ["--magmom_key", "magmoms", "--predict_magmom"],
         "vector": ["--magmom_key", "initial_magmoms", "--magforces_key", "mag_forces", "--predict_magmom",
                    "--spin_orbit"]}
KEYS = ("test_energy_mae_mev_per_atom", "zero_shot_test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A",
        "zero_shot_test_force_mae_mev_per_A", "test_magforce_mae_mev_per_muB", "magnetic_fit")


def main(argv=None) -> int:
    import torch
    from ase.io import write
    from e3nn import o3

    from sparsekern.integrations.mace.models import mace_mp0_shaped

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, help="folder for the model, frames and runs (default: a new temporary one)")
    args = p.parse_args(argv)
    root = args.work or Path(tempfile.mkdtemp(prefix="sparsekern-poor-base-"))
    root.mkdir(parents=True, exist_ok=True)
    model = mace_mp0_shaped("small", seed=1, num_elements=2, atomic_numbers=[8, 28], max_ell=2, correlation=2,
                            hidden_irreps=o3.Irreps("8x0e+8x1o"), r_max=3.5, radial_MLP=[8, 8], num_bessel=4,
                            atomic_energies=[-3.0, -4.0])  # the test module's tiny model
    torch.save(model, root / "tiny.model")
    for collinear, name in ((True, "collinear"), (False, "vector")):
        write(root / f"ni_{name}_train.xyz", cases._nickel_frames(8, 2, collinear))
        write(root / f"ni_{name}_test.xyz", cases._nickel_frames(3, 3, collinear))
    rows = []
    for name, flags in FLAGS.items():
        for weight in ("100", "1"):
            out = root / f"{name}_forces_weight{weight}"
            if cases._run_nickel(root, name, out, *flags, "--forces_weight", weight) != 0:
                return 1
            m = json.loads((out / "metrics.json").read_text())
            rows.append({"data": name, "forces_weight": float(weight), **{k: m.get(k) for k in KEYS}})
    result = ROOT / "benchmarks" / "results" / f"magnetism_poor_base_{datetime.date.today()}.json"
    result.write_text(json.dumps({"command": "python benchmarks/magnetism_poor_base.py", "machine": platform.node(),
                                  "rows": rows}, indent=1))
    print(f"wrote {result}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
