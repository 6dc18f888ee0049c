"""Forgetting over seeds: reads result files of ``forgetting.py`` runs that differ only
in the seed of the fine-tuning runs they score and writes, per tuned data set and
method, the change of the force MAE from zero-shot on each held-out set, mean and range
over the seeds, and its mean over the held-out sets.

    .venv-sevenn/bin/python benchmarks/forgetting_seeds.py FILE[:LABEL,LABEL] ...

``:LABEL,...`` keeps only those methods of a file (a file may score other settings
under the same label); zero-shot is read from every file and must agree.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def read(specs):
    """(tuned, label) -> per seed file {held-out set: change from zero-shot}."""
    changes, zeros = defaultdict(list), {}
    for spec in specs:
        path, _, labels = spec.partition(":")
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: not a forgetting.py result file ({e})")
        for tuned, by_model in result.items():
            if not isinstance(by_model, dict) or "zero-shot" not in by_model:
                raise SystemExit(f"{path}: not a forgetting.py result file (no zero-shot row for {tuned})")
            zero = zeros.setdefault(tuned, by_model["zero-shot"])
            if any(abs(by_model["zero-shot"][k] / zero[k] - 1) > 1e-6 for k in zero):  # threads: round-off
                raise SystemExit(f"{path}: zero-shot on {tuned}'s held-out sets differs from the first file's "
                                 "(other frames or another model?)")
            for label, maes in by_model.items():
                if label != "zero-shot" and (not labels or label in labels.split(",")):
                    changes[tuned, label].append({s: maes[s] / zero[s] - 1 for s in maes})
    return changes


def table(changes) -> str:
    lines = []
    for tuned in dict.fromkeys(t for t, _ in changes):
        rows = {label: runs for (t, label), runs in changes.items() if t == tuned}
        sets = list(next(iter(rows.values()))[0])
        lines += [f"\nTuned on **{tuned}**: change of the force MAE from zero-shot, mean (min to max) over seeds\n",
                  "| method | seeds | " + " | ".join(sets) + " | mean over sets |", "|---|---|" + "---|" * (len(sets) + 1)]
        for label, runs in rows.items():
            cells = []
            for s in sets:
                v = [100 * r[s] for r in runs]
                cells.append(f"{sum(v) / len(v):+.0f} % ({min(v):+.0f} to {max(v):+.0f})")
            overall = sum(100 * r[s] for r in runs for s in sets) / (len(runs) * len(sets))
            lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {overall:+.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="forgetting_<date>.json, optionally :LABEL,LABEL")
    changes = read(p.parse_args(argv).files)
    if not changes:
        raise SystemExit("no method rows in these files (check the :LABEL filters)")
    print(table(changes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
