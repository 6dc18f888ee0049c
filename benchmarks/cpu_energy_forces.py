"""CPU: energy + forces of a MACE-MP-0-medium-shaped model (128x0e+128x1o, 89 elements,
correlation 3) on a 64-atom crystal, e3nn vs sparsekern's torch back end, side by side
in one run: calls alternate between the two models (e3nn, ours, e3nn, ...) and the best
of each is kept, so load from other processes hits both alike. Each dtype is timed with
``--threads`` threads and with one (less sensitive to load). ``--training`` also times
a force-training step (forces with create_graph, then the force loss's parameter
gradients). Writes benchmarks/results/cpu_energy_forces_<date>.json (``_2``, ``_3``.. for a
day's later runs) with the commit measured, and prints a table.

    python benchmarks/cpu_energy_forces.py [--threads 2] [--repeats 5] [--training]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from ase.build import bulk

import sparsekern
from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped

import record  # benchmarks/record.py


def crystal():
    """Rocksalt NaCl, 2x2x2 conventional cells (64 atoms), rattled."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=1)
    return atoms


def best_times(fns, repeats: int):
    """Best wall time of each function, calls interleaved."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def inference(model, batch):
    return lambda: model(batch, compute_force=True)


def training_step(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        forces = model(batch, compute_force=True, training=True)["forces"]
        torch.autograd.grad(forces.square().sum(), params, allow_unused=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--training", action="store_true", help="also time a force-training step")
    args = parser.parse_args()
    atoms = crystal()
    rows = []
    for dtype in (torch.float64, torch.float32):
        e3nn_model = mace_mp0_shaped(args.size, dtype=dtype)
        ours = sparsekern.patch(copy.deepcopy(e3nn_model), backend="torch")
        batch = mace_batch(e3nn_model, [atoms])
        f0 = e3nn_model(batch, compute_force=True)["forces"]
        f1 = ours(batch, compute_force=True)["forces"]
        tasks = [("energy+forces", inference)] + ([("training step", training_step)] if args.training else [])
        for threads in sorted({args.threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            for task, make in tasks:
                t_e3nn, t_ours = best_times([make(e3nn_model, batch), make(ours, batch)], args.repeats)
                rows.append({
                    "dtype": str(dtype).replace("torch.", ""), "task": task, "threads": threads,
                    "atoms": len(atoms), "edges": int(batch["edge_index"].shape[1]),
                    "e3nn_s": t_e3nn, "sparsekern_s": t_ours, "speedup": t_e3nn / t_ours,
                    "max_force_rel_err": ((f1 - f0).abs().max() / f0.abs().max()).item(),
                })
    out = record.write("cpu_energy_forces", {
        "benchmark": "energy+forces, MACE-MP-0-%s-shaped, 64-atom crystal" % args.size,
        "command": "python benchmarks/cpu_energy_forces.py --threads %d --repeats %d --size %s%s"
                   % (args.threads, args.repeats, args.size, " --training" if args.training else ""),
        "rows": rows,
    })
    print(f"{'dtype':<9}{'task':<15}{'threads':>8}{'e3nn (s)':>10}{'ours (s)':>10}{'speedup':>9}{'max rel dF':>12}")
    for r in rows:
        print(f"{r['dtype']:<9}{r['task']:<15}{r['threads']:>8}{r['e3nn_s']:>10.4f}{r['sparsekern_s']:>10.4f}"
              f"{r['speedup']:>8.2f}x{r['max_force_rel_err']:>12.1e}")
    print(f"{len(atoms)} atoms, {rows[0]['edges']} edges; load average {os.getloadavg()}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
