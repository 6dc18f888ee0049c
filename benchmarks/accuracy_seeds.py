"""The accuracy benchmark over seeds: reads the result files of ``accuracy.py`` runs that
differ only in ``--seed`` (accuracy_<mode>_<date>.json for seed 0, ..._seed<N>.json for
the others) and writes the mean and the range of each (data set, method) row, with each
method's gap to full fine-tuning: one seed's random start decides a sparse delta's mask,
so one seed cannot resolve a few per cent (benchmarks/NOTES.md).

    .venv-sevenn/bin/python benchmarks/accuracy_seeds.py benchmarks/results/accuracy_full_2026-12-03*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

KEYS = ("force_mae_mev_per_A", "energy_mae_mev_per_atom")


def table(results: list) -> str:
    settings = [{k: v for k, v in r["settings"].items() if k not in ("seed", "jobs")} for r in results]
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"the files differ in more than the seed: {settings}")
    values = defaultdict(lambda: defaultdict(list))  # (data, method) -> key -> per seed
    for r in results:
        for row in r["rows"]:
            for k in KEYS:
                values[row["dataset"], row["method"]][k].append(row[k])
    seeds = sorted(r["settings"]["seed"] for r in results)
    lines = [f"Seeds {seeds}; settings {json.dumps(settings[0])}.", "",
             "| data | method | seeds | force MAE mean (min-max), meV/Å | vs full | energy MAE mean, meV/atom |",
             "|---|---|---|---|---|---|"]
    for (data, method), v in values.items():
        f, e = v[KEYS[0]], v[KEYS[1]]
        full = values.get((data, "full"), {}).get(KEYS[0])
        gap = (f"{100 * (sum(f) / len(f) / (sum(full) / len(full)) - 1):+.1f} %"
               if full and len(full) == len(f) and method not in ("full", "zero-shot") else "")
        lines.append(f"| {data} | {method} | {len(f)} | {sum(f) / len(f):.1f} ({min(f):.1f}-{max(f):.1f}) | {gap} "
                     f"| {sum(e) / len(e):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="accuracy.py result JSONs, one per seed")
    args = p.parse_args(argv)
    print(table([json.loads(f.read_text()) for f in args.files]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
