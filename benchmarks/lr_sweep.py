"""Learning rate per method, chosen on a validation split (never the test set): SevenNet-0
fine-tuned on the accuracy benchmark's aspirin training frames (the first 50 of
revised_aspirin/train.xyz) and scored on revised_aspirin/valid.xyz (50 other frames).
Each method gets a grid of learning rates, everything else as in benchmarks/accuracy.py;
the learning rate with the lowest validation force MAE is the method's pick (the loss
weighs forces 100:1). The picks set sparsekern.finetune.methods' defaults. Results go
to benchmarks/results/lr_sweep_<date>.{json,md}.

    .venv-sevenn/bin/python benchmarks/lr_sweep.py              # about 40 min on 2 cores
    .venv-sevenn/bin/python benchmarks/lr_sweep.py --epochs 4   # a shorter budget
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from accuracy import ROOT, atomic_text, machine, run_one, write_split

from sparsekern.finetune.methods import default_lr
from sparsekern.locations import data_dir

GRID = {"full": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "lora": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "sparse": [1e-2, 3e-2, 1e-1, 3e-1]}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Learning rate per method, {result['date']}", "",
             f"SevenNet-0 on aspirin: {s['n_train']} training frames, {s['n_valid']} validation frames "
             f"(revised_aspirin/valid.xyz), {s['epochs']} epochs, batch {s['batch_size']}, Adam (amsgrad), constant lr; "
             f"sparse at density {s['density']}. Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores.",
             f"Command: `{result['command']}`", "",
             "| method | lr | valid force MAE (meV/Å) | valid energy MAE (meV/atom) | train wall (s) |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        mark = " **(pick)**" if result["picks"][r["method"]] == r["lr"] else ""
        lines.append(f"| {r['method']} | {r['lr']:g}{mark} | {r['force_mae_mev_per_A']:.1f} | "
                     f"{r['energy_mae_mev_per_atom']:.2f} | {r['wall_s']:.0f} |")
    lines += ["", f"Zero-shot: force MAE {result['zero_shot_force_mae_mev_per_A']:.1f} meV/Å, energy MAE "
              f"{result['zero_shot_energy_mae_mev_per_atom']:.2f} meV/atom (after the fitted E0 shift).",
              "", f"The trainer's default lr for these runs (sparsekern.finetune.methods.default_lr, at this density, "
                  f"with the moving average) when this ran: {result['defaults']}.", ""]
    edge = [m for m, lr in result["picks"].items() if lr in (GRID[m][0], GRID[m][-1])]
    if edge:
        lines += [f"The pick sits at the edge of the grid for {', '.join(edge)}: widen the grid before trusting it.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--density", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="full,lora,sparse")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sparsekern-lr-sweep",
                   help="splits, checkpoints and models (outside the repository; rerunning resumes)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    src = data_dir() / "rmd17/revised_aspirin"
    if not (src / "train.xyz").exists():
        p.error(f"aspirin data missing under {src}; set SPARSEKERN_DATA")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    train = write_split(src / "train.xyz", slice(0, 50), work / "aspirin_train.xyz")
    valid = write_split(src / "valid.xyz", slice(None), work / "aspirin_valid.xyz")
    rows, runs = [], {}
    for method in args.methods.split(","):
        extra = ["--density", str(args.density)] if method == "sparse" else []
        for lr in GRID[method]:
            m = run_one(work / "runs" / f"{method}_lr{lr:g}", train, valid, method, extra, args, lr)
            runs[f"{method} lr {lr:g}"] = m
            rows.append({"method": method, "lr": lr, "force_mae_mev_per_A": m["test_force_mae_mev_per_A"],
                         "energy_mae_mev_per_atom": m["test_energy_mae_mev_per_atom"], "wall_s": m["wall_s"],
                         "changed_fraction": m["changed_fraction"]})
    picks = {m: min((r for r in rows if r["method"] == m), key=lambda r: r["force_mae_mev_per_A"])["lr"]
             for m in dict.fromkeys(r["method"] for r in rows)}
    first = next(iter(runs.values()))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    result = {"date": date, "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "settings": {"epochs": args.epochs, "batch_size": args.batch_size, "density": args.density,
                           "seed": args.seed, "n_train": first["n_train"], "n_valid": first["n_test"]},
              "zero_shot_force_mae_mev_per_A": first["zero_shot_test_force_mae_mev_per_A"],
              "zero_shot_energy_mae_mev_per_atom": first["zero_shot_test_energy_mae_mev_per_atom"],
              "rows": rows, "picks": picks, "runs": runs,
              "defaults": {m: default_lr(m, args.density) for m in sorted(picks)}}
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"lr_sweep_{date}"
    atomic_text(stem.with_suffix(".json"), json.dumps(result, indent=1))
    atomic_text(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
