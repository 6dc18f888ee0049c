"""Forgetting: how a fine-tuned model does on data it was not tuned on. Reads the merged
models of benchmarks/accuracy.py's runs (its work directory) and scores each, and the
zero-shot foundation model, on held-out sets of other kinds: for the molecules (aspirin,
3BPA) other rMD17 molecules and silicon, for silicon the molecules. Test force MAE only:
the data sets' energies come from different DFT codes and settings, so an energy error
on them says more about reference energies than about forgetting.

    .venv-sevenn/bin/python benchmarks/forgetting.py [--datasets aspirin] [--frames 50]

Writes benchmarks/results/forgetting_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import machine  # noqa: E402
from sparsekern.files import atomic_write  # noqa: E402
from sparsekern.locations import data_dir  # noqa: E402

MOLECULES = ("ethanol", "paracetamol", "toluene")


def other_sets(tuned: str, frames: int) -> dict:
    """name -> (file, ase index) of the held-out sets a model tuned on ``tuned`` is scored on."""
    d = data_dir()
    sets = {f"rMD17 {m}": (d / f"rmd17/revised_{m}/test.xyz", f":{frames}") for m in MOLECULES}
    sets["silicon"] = (d / "si_mlearn/Si_test.xyz", f":{frames}")
    sets["aspirin"] = (d / "rmd17/revised_aspirin/test.xyz", f":{frames}")
    sets["3BPA"] = (d / "3bpa/train_300K.xyz", f"400:{400 + frames}")
    return {k: v for k, v in sets.items() if k.lower() != tuned}


def force_mae(calc, frames) -> float:
    """Force MAE in meV/Å over ``frames``."""
    errors = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        errors.append(np.abs(atoms.get_forces() - atoms.arrays["REF_forces"]).ravel())
    return 1000 * float(np.concatenate(errors).mean())


def models(workdir: Path, tuned: str, seed: int) -> dict:
    """label -> merged model file of each finished run on ``tuned`` with ``seed`` (named
    as accuracy.py names them: ``_seed<N>`` after the lr, none for seed 0), and the
    zero-shot model. Two finished runs of one method and seed (at two lrs) are refused."""
    found, where = {"zero-shot": "7net-0"}, {}
    for run in sorted((workdir / "runs").glob(f"{tuned}_train__*")):
        method, _, tail = run.name.split("__", 1)[1].rpartition("_lr")
        named = re.search(r"_seed(\d+)$", tail)
        merged = run / "merged_sevennet.pth"
        if not method or (int(named.group(1)) if named else 0) != seed or not merged.exists():
            continue
        label = method.replace("_", " ")
        if label in where:
            raise SystemExit(f"two finished {label} runs of seed {seed} on {tuned}: {where[label]} and {run.name}; "
                             "move one out of the work directory")
        found[label], where[label] = str(merged), run.name
    return found


def table(results: dict) -> str:
    lines = []
    for tuned, by_model in results.items():
        sets = list(next(iter(by_model.values())))
        lines += [f"\nTuned on **{tuned}**: test force MAE (meV/Å) on data it was not tuned on, "
                  "and the change from zero-shot\n", "| model | " + " | ".join(sets) + " |",
                  "|---|" + "---|" * len(sets)]
        zero = by_model["zero-shot"]
        for label, maes in by_model.items():
            cells = [f"{maes[s]:.1f}" + ("" if label == "zero-shot" else f" ({100 * (maes[s] / zero[s] - 1):+.0f} %)")
                     for s in sets]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sparsekern-accuracy" / "full")
    p.add_argument("--datasets", default="aspirin,silicon,3bpa")
    p.add_argument("--frames", type=int, default=50, help="frames of each held-out set")
    p.add_argument("--seed", type=int, default=0, help="score the runs of this seed (accuracy.py --seed)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    from ase.io import read
    from sevenn.calculator import SevenNetCalculator

    results = {}
    for tuned in args.datasets.split(","):
        found = models(args.workdir, tuned, args.seed)
        if len(found) == 1:
            print(f"{tuned}: no finished run of seed {args.seed} in {args.workdir / 'runs'}; skipped", flush=True)
            continue
        sets = {name: read(path, index) for name, (path, index) in other_sets(tuned, args.frames).items()}
        results[tuned] = {}
        for label, model in found.items():
            calc = SevenNetCalculator(model, device="cpu")
            results[tuned][label] = {name: force_mae(calc, frames) for name, frames in sets.items()}
            print(tuned, label, {k: round(v, 1) for k, v in results[tuned][label].items()}, flush=True)
    if not results:  # before anything is written: an earlier result file stays
        raise SystemExit(f"no finished run of seed {args.seed} in {args.workdir / 'runs'} for {args.datasets}; "
                         "nothing written")
    date = datetime.date.today().isoformat()
    head = (f"# Forgetting, {date}\n\nMachine: {machine()['cpu']}; SevenNet-0 fine-tuned "
            f"by benchmarks/accuracy.py (its merged models); {args.frames} frames of each held-out set. Command: "
            f"`.venv-sevenn/bin/python benchmarks/forgetting.py --datasets {args.datasets} --frames {args.frames} "
            f"--seed {args.seed}`.\n")
    atomic_write(args.results / f"forgetting_{date}.md", lambda tmp: Path(tmp).write_text(head + table(results) + "\n"))
    atomic_write(args.results / f"forgetting_{date}.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    print(head + table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
