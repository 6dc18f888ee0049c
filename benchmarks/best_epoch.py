"""Is the lowest validation loss's epoch a better result than the last? SevenNet-0
fine-tuned sparsely (3 %) with validation frames, once per seed; the test errors of the
selected epoch (the run's result) and of the last one (the same run's checkpoint again
with ``--last_epoch``: no training), with the per-epoch validation loss. ``--data si``:
the demo's silicon (every 4th Si_train frame, 20 % held out as MACE's --valid_fraction
does, Si_test.xyz; the demo's loss weights); ``--data aspirin``: revised MD17 aspirin
(its 100 training and 50 validation frames, the first 200 test frames). ``--stage_two``:
with MACE's Stage Two (its defaults: the last quarter of the epochs, energy weight 1000,
lr / 10), the result chosen among its epochs.

    .venv-sevenn/bin/python benchmarks/best_epoch.py [--data si|aspirin] [--epochs 10] [--seeds 0 1 2] [--stage_two]

Writes results/best_epoch_<date>.json (benchmarks/record.py) and prints a table."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record  # noqa: E402

KEYS = ("energy_mae_mev_per_atom", "force_mae_mev_per_A")


def data(name: str) -> dict:
    """The Settings' data arguments of ``name``, checked to exist."""
    from sparsekern.locations import data_dir

    if name == "si":
        src = data_dir() / "si_mlearn"
        files = dict(train=src / "Si_train.xyz", test=src / "Si_test.xyz")
        args = dict(valid_fraction=0.2, energy_weight=100.0)
    else:
        src = data_dir() / "rmd17" / "revised_aspirin"
        files = dict(train=src / "train.xyz", valid=src / "valid.xyz", test=src / "test.xyz")
        args = dict(max_test=200)
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise SystemExit(f"best_epoch.py: error: data missing: {', '.join(missing)}; set SPARSEKERN_DATA")
    return {**{k: str(p) for k, p in files.items()}, **args}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("si", "aspirin"), default="si")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--stage_two", action="store_true", help="MACE's Stage Two, its defaults")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")

    from ase.io import read, write

    from sparsekern.finetune.settings import Settings
    from sparsekern.finetune.trainer import run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        given = data(args.data)
        if args.data == "si":  # every 4th frame: the held-out fifth of them validates
            write(Path(tmp) / "train.xyz", read(given["train"], "::4"))
            given["train"] = str(Path(tmp) / "train.xyz")
        for seed in args.seeds:
            out = str(Path(tmp) / f"seed{seed}")
            settings = dict(model="7net-0", method="sparse", out=out, epochs=args.epochs, seed=seed, progress=False,
                            stage_two=args.stage_two, **given)
            best = run(Settings(**settings))
            last = run(Settings(**settings, last_epoch=True))  # the checkpoint's last epoch, no training
            rows.append({"seed": seed, "selected_epoch": best["selected_epoch"],
                         "valid_loss": [h["valid_loss"] for h in best["history"]],
                         **{f"zero_shot_{k}": best[f"zero_shot_test_{k}"] for k in KEYS},
                         **{f"selected_{k}": best[f"test_{k}"] for k in KEYS},
                         **{f"last_{k}": last[f"test_{k}"] for k in KEYS}})
    print("| seed | selected epoch | energy MAE: zero-shot, selected, last (meV/atom) | "
          "force MAE: zero-shot, selected, last (meV/Å) |")
    print("|---|---|---|---|")
    for r in rows:
        cells = [f"{r[f'zero_shot_{k}']:.2f}, {r[f'selected_{k}']:.2f}, {r[f'last_{k}']:.2f}" for k in KEYS]
        print(f"| {r['seed']} | {r['selected_epoch']} of {args.epochs} | " + " | ".join(cells) + " |")
    path = record.write("best_epoch", {"command": " ".join(["benchmarks/best_epoch.py", *sys.argv[1:]]),
                                       "args": vars(args), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
