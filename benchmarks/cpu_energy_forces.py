"""CPU: energy + forces of a MACE-MP-0-medium-shaped model (128x0e+128x1o, 89 elements,
correlation 3) on a 64-atom crystal, e3nn vs sparsekern's torch back end, side by side
in one run. Writes benchmarks/results/cpu_energy_forces_<date>.json and prints a table.

    python benchmarks/cpu_energy_forces.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from ase.build import bulk

import sparsekern
from sparsekern.model_zoo import mace_batch, mace_mp0_shaped


def crystal():
    """Rocksalt NaCl, 2x2x2 conventional cells (64 atoms), rattled."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=1)
    return atoms


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="medium")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    atoms = crystal()
    rows = []
    for dtype in (torch.float64, torch.float32):
        e3nn_model = mace_mp0_shaped(args.size, dtype=dtype)
        ours = sparsekern.patch(copy.deepcopy(e3nn_model), backend="torch")
        batch = mace_batch(e3nn_model, [atoms])
        results = {}
        for name, model in (("e3nn", e3nn_model), ("sparsekern", ours)):
            results[name] = best_time(lambda: model(batch, compute_force=True), args.repeats)
        f0 = e3nn_model(batch, compute_force=True)["forces"]
        f1 = ours(batch, compute_force=True)["forces"]
        rows.append({
            "dtype": str(dtype).replace("torch.", ""), "atoms": len(atoms), "edges": int(batch["edge_index"].shape[1]),
            "e3nn_s": results["e3nn"], "sparsekern_s": results["sparsekern"],
            "speedup": results["e3nn"] / results["sparsekern"],
            "max_force_rel_err": ((f1 - f0).abs().max() / f0.abs().max()).item(),
        })
    record = {
        "benchmark": "energy+forces, MACE-MP-0-%s-shaped, 64-atom crystal" % args.size,
        "command": "python benchmarks/cpu_energy_forces.py --threads %d --repeats %d --size %s"
                   % (args.threads, args.repeats, args.size),
        "date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}", "rows": rows,
    }
    out = Path(__file__).parent / "results" / f"cpu_energy_forces_{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"{'dtype':<9}{'atoms':>6}{'edges':>7}{'e3nn (s)':>10}{'ours (s)':>10}{'speedup':>9}{'max rel dF':>12}")
    for r in rows:
        print(f"{r['dtype']:<9}{r['atoms']:>6}{r['edges']:>7}{r['e3nn_s']:>10.4f}{r['sparsekern_s']:>10.4f}"
              f"{r['speedup']:>8.2f}x{r['max_force_rel_err']:>12.1e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
