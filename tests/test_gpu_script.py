"""The GPU run is one prepared script, rarely run (a GPU is seldom lent): what it calls
must exist, or the run is lost (its CPU smoke once named a test file that had moved), and
the suite's cases must compute what they claim (its parity lines, on the CPU)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_run_gpu_names_existing_files():
    script = (ROOT / "benchmarks/run_gpu.sh").read_text()
    named = set(re.findall(r"\b((?:tests|benchmarks)/[\w/.-]+\.py)\b", script))
    assert named, "run_gpu.sh names no test or benchmark file: the pattern is stale"
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []


def test_suite_smoke_parity():
    """The suite on the CPU (TRITON_INTERPRET=1, tiny model): every back end computing a
    layer's function agrees with the torch back end (fails with a variant's per-edge rows
    left in their old order when its edges are reordered, as the by-receiver conv's were),
    also where ``--backends`` leaves the torch back end untimed (no parity was recorded)."""
    pytest.importorskip("mace")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_suite.py"), "--cpu-smoke", "--ops", "conv1,products1",
                          "--backends", "e3nn,triton,triton_by_receiver", "--e2e-atoms", "0"],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    wrote = re.search(r"wrote (\S+\.json)", run.stdout)
    checks = json.loads(Path(wrote.group(1)).read_text())["checks"]
    errors = {(c["op"], name): err for c in checks if c.get("dtype") == "float32" for name, err in c["rel_err"].items()}
    assert set(errors) == {("conv1", "e3nn"), ("conv1", "triton"), ("conv1", "triton_by_receiver"),
                           ("products1", "e3nn"), ("products1", "triton")}
    assert all(isinstance(e, float) and e < 1e-5 for e in errors.values()), errors
    assert not [c for c in checks if "error" in c]
    rows = json.loads(Path(wrote.group(1)).read_text())["results"]
    assert rows and not [r for r in rows if "torch" in r["ms"]]  # checked against, not timed
