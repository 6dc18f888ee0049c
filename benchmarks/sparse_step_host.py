"""CPU: a sparse (STR, 3 %) fine-tuning step of a MACE-MP-0-medium-shaped model as shipped
(the thresholded deltas computed together before the forward, ``delta.prepare_values``;
the density controller's order statistic by numpy's introselect) against the code before
2026-12-05 (one delta at a time, torch's kthvalue) and with only the first change, side by
side in one run: steps alternate between three copies and the best of each is kept. A step is a
forward with forces, a force and energy loss, its backward and an Adam step. On a small
molecule the step is mostly host overhead (what a GPU step with small batches waits
on); the 64-atom crystal is mostly arithmetic. Counts each variant's aten ops too.

    python benchmarks/sparse_step_host.py [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import platform
import sys
from pathlib import Path

import torch
from ase.build import bulk, molecule
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sparsekern  # noqa: E402
from sparsekern.finetune import density  # noqa: E402
from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped  # noqa: E402
from cpu_energy_forces import best_times, crystal  # noqa: E402


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def step_fn(model, batch, together: bool, introselect: bool):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()

    def step():
        saved = density.prepare_values, density.split_point
        if not together:
            density.prepare_values = lambda deltas: None
        if not introselect:
            density.split_point = lambda values, k: torch.kthvalue(values, k).values
        try:
            out = model(dict(batch), compute_force=True, training=True)
            loss = out["forces"].square().mean() + out["energy"].square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        finally:
            density.prepare_values, density.split_point = saved
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = mace_mp0_shaped("medium", dtype=torch.float32)
    water = molecule("H2O")
    systems = {"H2O (3 atoms)": water, "NaCl crystal (64 atoms)": crystal()}
    print(f"# sparse fine-tuning step, MACE-MP-0 medium shape, float32, CPU ({platform.processor() or platform.machine()}, "
          f"{args.threads} threads), {datetime.date.today()}\n\n`python benchmarks/sparse_step_host.py "
          f"--threads {args.threads} --repeats {args.repeats}`: best of {args.repeats}, steps interleaved\n")
    print("| system | before (ms) | deltas together (ms) | and introselect: now (ms) | now vs before | aten ops "
          "before | now |\n|---|---|---|---|---|---|---|")
    for name, atoms in systems.items():
        models = [sparsekern.prepare(copy.deepcopy(base), sparsekern.SparseConfig(density=0.03)) for _ in range(3)]
        batch = mace_batch(models[0], [atoms])
        fns = [step_fn(m, batch, together, introselect)
               for m, (together, introselect) in zip(models, [(False, False), (True, False), (True, True)])]
        ops = []
        for fn in fns:
            fn()
            with _Ops() as count:
                fn()
            ops.append(sum(count.n.values()))
        before, together, now = best_times(fns, args.repeats)
        print(f"| {name} | {before * 1e3:.1f} | {together * 1e3:.1f} | {now * 1e3:.1f} | {before / now:.2f}x | "
              f"{ops[0]} | {ops[2]} |")


if __name__ == "__main__":
    main()
