"""How often the density controller changes exactly the target number of entries: the
tests' tiny MACE case (``helpers.write_tiny_mace_case``) prepared for sparse fine-tuning
(STR, 3 %), its deltas' values scaled at random ``--trials`` times, calibrated each time,
and the entries that change counted against round(density x entries). ``--kth``: the
threshold at the k-th smallest score itself, as before 2026-12-06 (then the exp and log
round-off decide that entry's side), instead of between the k-th and (k+1)-th.

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 .venv-mace/bin/python benchmarks/density_count.py [--kth] [--trials 30]

Writes results/density_count_<date>.json (benchmarks/record.py) and prints the count."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import record  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kth", action="store_true", help="the threshold at the k-th smallest score (the old rule)")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--density", type=float, default=0.03)
    args = p.parse_args(argv)

    from helpers import write_tiny_mace_case

    from sparsekern.finetune import density
    from sparsekern.finetune.config import SparseConfig
    from sparsekern.finetune.lifecycle import prepare
    from sparsekern.integrations import family_for

    if args.kth:  # the k-th smallest itself
        density.split_point = lambda values, k: torch.sort(values).values[k - 1]
    with tempfile.TemporaryDirectory() as tmp:
        spec = str(write_tiny_mace_case(Path(tmp), n_train=1) / "tiny.model")
        model = prepare(family_for(spec).load(spec, "cpu"), SparseConfig(density=args.density, seed=0))
    deltas = density._thresholded(model)
    entries = sum(d.scores().numel() for d in deltas)
    keep = round(args.density * entries)
    g = torch.Generator().manual_seed(1)
    off = []
    for _ in range(args.trials):
        with torch.no_grad():
            for d in deltas:
                d.v.mul_(1 + 0.3 * torch.randn(d.v.shape, generator=g, dtype=d.v.dtype))
            density.calibrate_density(model, args.density)
            off.append(sum(int((d() != 0).sum()) for d in deltas) - keep)
    wrong = sum(o != 0 for o in off)
    print(f"{'k-th' if args.kth else 'between the k-th and (k+1)-th'}: {wrong} of {args.trials} calibrations "
          f"changed other than {keep} of {entries} entries (differences {sorted(set(off))})")
    record.write("density_count", {"command": " ".join(sys.argv), "rule": "kth" if args.kth else "split_point",
                                   "trials": args.trials, "entries": entries, "keep": keep, "off_by": off,
                                   "wrong": wrong, "dtype": str(deltas[0].v.dtype)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
