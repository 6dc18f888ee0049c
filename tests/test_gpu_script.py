"""The GPU run is one prepared script, rarely run (a GPU is seldom lent): what it calls
must exist, or the run is lost (its CPU smoke once named a test file that had moved)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_gpu_names_existing_files():
    script = (ROOT / "benchmarks/run_gpu.sh").read_text()
    named = set(re.findall(r"\b((?:tests|benchmarks)/[\w/.-]+\.py)\b", script))
    assert named, "run_gpu.sh names no test or benchmark file: the pattern is stale"
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []
