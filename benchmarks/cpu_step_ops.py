"""CPU: where a sparse training step's time goes, op by op. Each aten op of the step
(``cpu_step_ab.py``'s, in a process set up as the trainer's; or with ``--task
energy_forces`` a float32 energy+forces of the MACE shape on 64 atoms, an MD call, as
``cpu_page_faults.py`` runs it) is timed as it runs, under a ``TorchDispatchMode``, and
summed by (op, the autograd node running it: ``fwd`` for the forward), each sum the
least over the timed calls; ``--op`` lists one op's calls by node and input shapes and
strides instead. The mode's own cost adds a few percent; compare rows, not the step's
total.

    .venv-sevenn/bin/python benchmarks/cpu_step_ops.py [--model 7net-0] [--top 25]
    .venv-mace/bin/python benchmarks/cpu_step_ops.py --model mace --op aten.clone.default
    .venv-mace/bin/python benchmarks/cpu_step_ops.py --model mace --task energy_forces
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("7net-0", "mace"), default="7net-0")
    ap.add_argument("--task", choices=("step", "energy_forces"), default="step")
    ap.add_argument("--steps", type=int, default=2, help="calls timed (after two warm-ups); figures are per call")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--op", help="list this op's calls (e.g. aten.clone.default) by node, shapes and strides")
    args = ap.parse_args()

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import sparsekern
    from cpu_page_faults import _task

    sparsekern.keep_freed_memory()  # as the trainer sets up its process
    step = _task(args.task, args.model, keep=False)
    for _ in range(2):
        step()
    per_call: list = []  # a Counter of ms per key, one per call; calls per key alike
    calls = collections.Counter()

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args_, **(kwargs or {}))
            ms = (time.perf_counter() - start) * 1e3
            node = torch._C._current_autograd_node()
            key = (str(func), node.name() if node is not None else "fwd")
            if args.op:
                if key[0] != args.op:
                    return out
                # a list argument's tensors too (cat's, stack's)
                flat = [t for a in args_ for t in (a if isinstance(a, (list, tuple)) else [a])]
                tensors = [t for t in flat if torch.is_tensor(t)]
                key += (tuple(tuple(t.shape) for t in tensors), tuple(t.stride() for t in tensors))
            per_call[-1][key] += ms
            calls[key] += 1 / args.steps
            return out

    start = time.perf_counter()
    with Timed():
        for _ in range(args.steps):
            per_call.append(collections.Counter())
            step()
    # each key's least time over the calls: a neighbour's load on the machine hits some
    # calls, not all, so the least is steadier than the mean
    total = collections.Counter({key: min(c[key] for c in per_call) for key in calls})
    print(f"{args.model}, {args.task}: {(time.perf_counter() - start) / args.steps:.3f} s a call under the mode, "
          f"{sum(total.values()):.0f} ms of {'calls of ' + args.op if args.op else 'ops'} "
          f"(each op's least over the {args.steps} calls)")
    for key, ms in total.most_common(args.top):
        print(f"{ms:8.1f} ms {calls[key]:6.0f} calls  " + "  ".join(str(k) for k in key))


if __name__ == "__main__":
    main()
