"""CPU: where a sparse training step's time goes, op by op. Each aten op of the step
(``cpu_step_ab.py``'s, in a process set up as the trainer's) is timed as it runs, under a
``TorchDispatchMode``, and summed by (op, the autograd node running it: ``fwd`` for the
forward); ``--op`` lists one op's calls by node and input shapes and strides instead. The
mode's own cost adds a few percent; compare rows, not the step's total.

    .venv-sevenn/bin/python benchmarks/cpu_step_ops.py [--model 7net-0] [--top 25]
    .venv-mace/bin/python benchmarks/cpu_step_ops.py --model mace --op aten.clone.default
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
    ap.add_argument("--steps", type=int, default=2, help="steps timed (after two warm-ups); figures are per step")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--op", help="list this op's calls (e.g. aten.clone.default) by node, shapes and strides")
    args = ap.parse_args()

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from cpu_step_ab import _step_fn

    step = _step_fn(args.model)
    for _ in range(2):
        step()
    total, calls = collections.Counter(), collections.Counter()

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
                tensors = [a for a in args_ if torch.is_tensor(a)]
                key += (tuple(tuple(t.shape) for t in tensors), tuple(t.stride() for t in tensors))
            total[key] += ms / args.steps
            calls[key] += 1 / args.steps
            return out

    start = time.perf_counter()
    with Timed():
        for _ in range(args.steps):
            step()
    print(f"{args.model}: {(time.perf_counter() - start) / args.steps:.3f} s a step under the mode, "
          f"{sum(total.values()):.0f} ms of {'calls of ' + args.op if args.op else 'ops'}")
    for key, ms in total.most_common(args.top):
        print(f"{ms:8.1f} ms {calls[key]:6.0f} calls  " + "  ".join(str(k) for k in key))


if __name__ == "__main__":
    main()
