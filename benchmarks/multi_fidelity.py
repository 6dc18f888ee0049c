"""A multi-fidelity SevenNet fine-tuned at the modality of its labels (benchmark, not CI).
The demo's silicon split and settings (every 8th frame of si_mlearn's Si_train.xyz, all
25 frames of Si_test.xyz; VASP PBE labels; sparse 3 %, 4 epochs, energy and force
weights 100), run on SevenNet-0 and on 7net-mf-0 at each of its modalities, each in its
own folder under --out (rerunning resumes); zero-shot and fine-tuned test errors to
benchmarks/results/multi_fidelity_<date>.json.

    .venv-sevenn/bin/python benchmarks/multi_fidelity.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import record  # noqa: E402  (benchmarks/record.py)

from sparsekern.demo import silicon, write_silicon  # noqa: E402
from sparsekern.finetune.settings import Settings  # noqa: E402
from sparsekern.finetune.trainer import run  # noqa: E402

RUNS = (("7net-0", None), ("7net-mf-0", "PBE"), ("7net-mf-0", "R2SCAN"))
ERRORS = ("energy_mae_mev_per_atom", "force_mae_mev_per_A")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every", type=int, default=8, help="train on every N-th frame of Si_train.xyz")
    parser.add_argument("--out", type=Path, default=Path("/tmp/multi_fidelity"))
    args = parser.parse_args(argv)
    train, test = silicon(parser, args.out, args.every)
    try:  # every run's arguments checked before anything is written: one line, no traceback
        runs = [(model, modal, Settings(model=model, modal=modal, train=str(train), test=str(test), method="sparse",
                                        epochs=args.epochs, energy_weight=100.0, progress=False,
                                        out=str(args.out / (model + (f"_{modal}" if modal else "")))))
                for model, modal in RUNS]
        write_silicon(train, args.every)
        rows = []
        for model, modal, settings in runs:
            m = run(settings)
            rows.append({"model": model, "modal": modal, "changed_fraction": m["changed_fraction"],
                         "wall_s": m["wall_s"], **{f"zero_shot_{k}": m[f"zero_shot_test_{k}"] for k in ERRORS},
                         **{k: m[f"test_{k}"] for k in ERRORS}})
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"multi_fidelity.py: error: {exc}\n")
    print(f"{'model':<20}{'zero-shot E / F':>22}{'fine-tuned E / F':>24}   (meV/atom / meV/A, Si_test)")
    for r in rows:
        label = r["model"] + (f" at {r['modal']}" if r["modal"] else "")
        print(f"{label:<20}{r['zero_shot_energy_mae_mev_per_atom']:>13.2f} / {r['zero_shot_force_mae_mev_per_A']:<6.1f}"
              f"{r['energy_mae_mev_per_atom']:>15.2f} / {r['force_mae_mev_per_A']:<6.1f}")
    path = record.write("multi_fidelity", {"command": " ".join(["benchmarks/multi_fidelity.py", *sys.argv[1:]]),
                                           "train": str(train), "epochs": args.epochs, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
