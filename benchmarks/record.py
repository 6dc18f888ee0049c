"""A benchmark's record in benchmarks/results/: what it measured, with the command, the
date, the commit and the machine's load, written whole (a temporary file renamed) and
never over a day's earlier run (``<name>_<date>_2.json``, ``_3``...)."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The tree measured: its commit, marked where it has uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True)
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + (" with changes" if dirty.stdout.strip() else "")


def write(name: str, record: dict) -> Path:
    """``record`` with the date, commit, machine and load average added, as
    results/<name>_<date>[_N].json; returns the path."""
    import torch

    record = {**record, "date": datetime.date.today().isoformat(), "commit": commit(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}", "load_average": os.getloadavg()}
    out = ROOT / "benchmarks" / "results" / f"{name}_{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for run in itertools.count(2):  # a day's earlier runs are kept
        if not out.exists():
            break
        out = out.with_name(f"{name}_{record['date']}_{run}.json")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out)
    return out
