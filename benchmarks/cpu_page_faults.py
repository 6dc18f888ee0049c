"""CPU: what glibc's malloc costs a process that frees and allocates the same large
tensors again and again, with and without ``sparsekern.keep_freed_memory()``: page faults
per call, best and median wall time. Each setting runs in its own process (the setting
is process-wide), alternately, ``--rounds`` times. Tasks: the sparse training step of
``cpu_step_ab.py`` (SevenNet-0 or an MP-0-medium-shaped MACE, four 63-atom silicon
frames, torch back end) and energy + forces of the MACE shape on the 64-atom crystal of
``cpu_energy_forces.py`` (float32), as in MD. Writes
benchmarks/results/cpu_page_faults_<task>_<model>_<date>.json (a day's later runs ``_2``...)
and prints a table.

    .venv-sevenn/bin/python benchmarks/cpu_page_faults.py --task step --model 7net-0
    .venv-mace/bin/python benchmarks/cpu_page_faults.py --task step --model mace
    .venv-mace/bin/python benchmarks/cpu_page_faults.py --task energy_forces --model mace
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import record  # noqa: E402  (benchmarks/record.py)

SETTINGS = ("glibc default", "keep_freed_memory")


def _task(task: str, model_name: str, keep: bool):
    import torch

    import sparsekern

    if keep and not sparsekern.keep_freed_memory():
        raise SystemExit("cpu_page_faults: keep_freed_memory changed nothing here (not glibc, or MALLOC_* set)")
    if task == "step":
        from cpu_step_ab import _step_fn

        return _step_fn(model_name, as_trainer=False)
    if model_name != "mace":
        raise SystemExit("cpu_page_faults: --task energy_forces runs the MACE shape (--model mace)")
    from cpu_energy_forces import crystal

    from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped

    model = mace_mp0_shaped("medium", dtype=torch.float32)
    sparsekern.patch(model, backend="torch")
    batch = mace_batch(model, [crystal()])
    return lambda: model(dict(batch), compute_force=True)


def _child(args) -> None:
    fn = _task(args.task, args.model, args.setting == SETTINGS[1])
    for _ in range(2):
        fn()
    times, before = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print("RESULT " + json.dumps({"times": times, "faults_per_call": faults / args.calls}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("step", "energy_forces"), default="step")
    ap.add_argument("--model", choices=("7net-0", "mace"), default="7net-0")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # a child's
    args = ap.parse_args()
    if args.setting:
        return _child(args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    runs = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for setting in SETTINGS:
            cmd = [sys.executable, __file__, "--task", args.task, "--model", args.model, "--calls", str(args.calls),
                   "--setting", setting]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                raise SystemExit(f"cpu_page_faults: the {setting} run failed:\n{out.stderr[-2000:]}")
            runs[setting].append(json.loads(lines[-1][len("RESULT "):]))
            res = runs[setting][-1]
            print(f"round {r + 1}, {setting}: best {min(res['times']):.4f} s, median "
                  f"{statistics.median(res['times']):.4f} s, {res['faults_per_call']:,.0f} faults a call", flush=True)
    rows = {s: {"best_s": min(min(x["times"]) for x in v),
                "median_s": [statistics.median(x["times"]) for x in v],
                "faults_per_call": [x["faults_per_call"] for x in v]} for s, v in runs.items()}
    (base, kept) = (rows[s] for s in SETTINGS)
    out = record.write(f"cpu_page_faults_{args.task}_{args.model}", {
        "task": args.task, "model": args.model, "rounds": args.rounds, "calls": args.calls,
        "command": "python benchmarks/cpu_page_faults.py " + " ".join(sys.argv[1:]), "rows": rows})
    print(f"\n{args.task}, {args.model}, CPU ({platform.machine()}, {os.cpu_count()} CPUs): best {base['best_s']:.4f} -> "
          f"{kept['best_s']:.4f} s ({base['best_s'] / kept['best_s']:.2f}x), "
          f"medians {[round(m, 4) for m in base['median_s']]} -> "
          f"{[round(m, 4) for m in kept['median_s']]}, faults a call {[round(f) for f in base['faults_per_call']]} -> "
          f"{[round(f) for f in kept['faults_per_call']]}\nwrote {out}")


if __name__ == "__main__":
    main()
