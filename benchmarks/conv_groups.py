"""CPU: what the torch conv's grouping of nodes by in-degree trades. Each receiver group
costs a fixed time (its gathers and products are issued once a group, in every pass);
each slot of a group, padding included, costs its share of the arithmetic. For each conv
layer of the model this times forward + backward (float32, 2 threads, a fresh graph each
call as in MD) of a graph of n nodes with 20 incoming edges each, planned as 1 and 4
groups of equal shape, and prints the cost of a slot, of a group, and their ratio: the
padding slots worth one more group; the model's row sums its layers, which share one plan
(``ops/torch/conv.GROUP_COST``). The rows also go to
benchmarks/results/conv_groups_<model>_<date>.json (a day's later runs ``_2``...).

    .venv-mace/bin/python benchmarks/conv_groups.py --model mace
    .venv-sevenn/bin/python benchmarks/conv_groups.py --model 7net-0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import record  # noqa: E402  (benchmarks/record.py)
import sparsekern  # noqa: E402
from sparsekern.layers import ChannelwiseConv  # noqa: E402
from sparsekern.ops.torch import conv as torch_conv  # noqa: E402

WIDTH = 20


def model_convs(name: str):
    if name == "mace":
        from sparsekern.integrations.mace.models import mace_mp0_shaped
        model = mace_mp0_shaped("medium", dtype=torch.float32)
    else:
        from sparsekern.integrations.sevennet.models import load_sevennet
        model = load_sevennet(name).float()
    sparsekern.patch(model, backend="torch")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ChannelwiseConv)]


def timed(conv, nodes: int, groups: int, repeats: int) -> float:
    """Best time of forward + backward with the nodes planned as ``groups`` equal groups."""
    g = torch.Generator().manual_seed(0)
    edges = nodes * WIDTH
    edge_index = torch.stack([torch.randint(0, nodes, (edges,), generator=g),
                              torch.arange(nodes).repeat_interleave(WIDTH)])
    args = [torch.randn(rows, dim, generator=g, requires_grad=True) for rows, dim in
            ((nodes, conv.irreps_in1.dim), (edges, conv.irreps_in2.dim), (edges, conv.weight_numel))]
    plan = torch_conv._groups_by_degree
    torch_conv._groups_by_degree = lambda degrees, cost: [(nodes // groups, WIDTH)] * groups
    try:
        best = float("inf")
        for _ in range(repeats + 1):
            fresh = edge_index.clone()  # a new graph: planned again, as in MD
            start = time.perf_counter()
            out = conv(*args, fresh)
            torch.autograd.grad(out.square().sum(), args)
            best = min(best, time.perf_counter() - start)
    finally:
        torch_conv._groups_by_degree = plan
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mace", help="mace (MACE-MP-0-medium-shaped) or a SevenNet model (7net-0)")
    ap.add_argument("--nodes", type=int, nargs=2, default=(64, 128), help="two graph sizes, for the slot's cost")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    small, large = args.nodes
    if not (0 < small < large and small % 4 == 0 and large % 4 == 0) or args.repeats < 1:
        ap.error(f"--nodes needs two sizes, the first smaller, each a multiple of 4 (four equal groups), "
                 f"and --repeats >= 1; got --nodes {small} {large} --repeats {args.repeats}")
    try:
        convs = model_convs(args.model)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        ap.error(f"--model {args.model}: {exc}".splitlines()[0])
    torch.set_num_threads(2)
    print(f"{'layer':<36}{'slot (us)':>10}{'group (ms)':>12}{'ratio (slots)':>15}")
    rows = []
    for name, conv in convs:
        t = {(n, k): timed(conv, n, k, args.repeats) for n in (small, large) for k in (1, 4)}
        slot = (t[large, 1] - t[small, 1]) / ((large - small) * WIDTH)
        group = (t[small, 4] - t[small, 1] + t[large, 4] - t[large, 1]) / 6  # three more groups, two sizes
        rows.append((name, slot, group))
    rows.append(("the model", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    for name, slot, group in rows:
        print(f"{name:<36}{slot * 1e6:>10.2f}{group * 1e3:>12.2f}{group / slot:>15.0f}")
    out = record.write(f"conv_groups_{args.model}", {
        "benchmark": f"torch conv, {args.model}: forward + backward of each layer, n x {WIDTH} edges, float32, "
                     "2 threads, planned as 1 and 4 groups",
        "command": f"python benchmarks/conv_groups.py --model {args.model} --nodes {small} {large} "
                   f"--repeats {args.repeats}",
        "rows": [{"layer": name, "slot_us": slot * 1e6, "group_ms": group * 1e3, "ratio_slots": group / slot}
                 for name, slot, group in rows]})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
