"""The whole GPU suite in one call: ``python benchmarks/gpu_suite.py [--quick]``.

Layers of a MACE-MP-0-medium-shaped model (random weights; 128 channels, l <= 3):
the two interaction convs and the element-indexed linears (skip_tp), on 5,000 atoms /
150,000 edges and 300 atoms / 9,000 edges, float32. Back ends: e3nn (gather, TP,
index_add, as MACE does without fusion), sparsekern's torch back end, the Triton
kernels (also with half the conv paths masked, and with a block-sparse delta), and
cuEquivariance's fused conv (MACE's ``conv_fusion``) where it imports ('n/a' otherwise).
Modes: fwd, fwd+bwd (all input gradients), and force training's fwd + grad with
create_graph + backward (``fwd+bwd+dbl``). Every entry is measured here: nothing is
written that was not measured. Writes ``benchmarks/results/gpu_suite_<date>.json`` and
``.md`` with the device name and date. A failing entry records its error and the suite
goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparsekern  # noqa: E402,F401
from sparsekern.layers import ChannelwiseConv, ElementLinear  # noqa: E402
from sparsekern.model_zoo import mace_mp0_shaped  # noqa: E402

SIZES = {"mp0_medium_5000at": (5000, 150000), "small_300at": (300, 9000)}
MODES = ("fwd", "fwd+bwd", "fwd+bwd+dbl")
DEV = "cuda"  # "cpu" only for --cpu-smoke (TRITON_INTERPRET=1, tiny shapes, nothing kept)


def timed(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, CUDA events, after warm-up
    (Triton compiles on the first call)."""
    for _ in range(warmup):
        fn()
    if DEV == "cpu":  # smoke test of the script itself
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def run_mode(f, inputs, mode):
    """One step of ``mode`` for ``out = f(*inputs)``."""
    if mode == "fwd":
        with torch.no_grad():
            return f(*inputs)
    args = [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    diff = [a for a in args if a is not None and a.requires_grad]
    out = f(*args)
    if mode == "fwd+bwd":
        return torch.autograd.grad(out, diff, torch.ones_like(out))
    grads = torch.autograd.grad((out * out).sum(), diff, create_graph=True)
    loss = sum((g * g).sum() for g in grads)
    return torch.autograd.grad(loss, diff)


def cueq_fused_conv(tp):
    """cuEquivariance's fused conv as MACE builds it (``conv_fusion``), or the reason not."""
    try:
        import cuequivariance_torch  # noqa: F401
        from mace.modules.wrapper_ops import CuEquivarianceConfig, TensorProduct
    except Exception as exc:  # not installed / no ops package
        return None, f"n/a ({type(exc).__name__}: {exc})"
    try:
        cfg = CuEquivarianceConfig(enabled=True, layout="mul_ir", group="O3_e3nn", optimize_all=True,
                                   conv_fusion=True)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            mod = TensorProduct(tp.irreps_in1, tp.irreps_in2, tp.irreps_out,
                                [tuple(i)[:5] for i in tp.instructions], shared_weights=False,
                                internal_weights=False, cueq_config=cfg)
        finally:
            torch.set_default_dtype(prev)
        if not hasattr(mod, "original_forward"):
            return None, "n/a (MACE did not build a fused cuEquivariance conv)"
        return mod.to(DEV), None
    except Exception as exc:
        return None, f"n/a ({type(exc).__name__}: {exc})"


def conv_bytes(conv, n_nodes, n_edges, itemsize=4):
    """Compulsory forward traffic: per-edge weights and edge attributes once, node
    features and output once (gathers and scatters assumed cached)."""
    return itemsize * (n_edges * (conv.weight_numel + conv.irreps_in2.dim)
                       + n_nodes * (conv.irreps_in1.dim + conv.irreps_out.dim))


def bench_conv(model, size, n_nodes, n_edges, args, results, checks):
    from sparsekern.kernels.triton import conv_fused

    g = torch.Generator(device=DEV).manual_seed(0)
    # neighbour-list order: edges grouped by sender, receivers random
    sender = torch.arange(n_nodes, device=DEV).repeat_interleave(n_edges // n_nodes)
    receiver = torch.randint(0, n_nodes, (sender.numel(),), device=DEV, generator=g)
    edge_index = torch.stack([sender, receiver])
    e = edge_index.shape[1]
    for li, block in enumerate(model.interactions):
        tp = block.conv_tp
        conv = ChannelwiseConv.from_e3nn(tp)
        x = torch.randn(n_nodes, conv.irreps_in1.dim, device=DEV, generator=g)
        sh = torch.randn(e, conv.irreps_in2.dim, device=DEV, generator=g)
        w = torch.randn(e, conv.weight_numel, device=DEV, generator=g)
        half = [t % 2 == 0 for t in range(len(conv.paths))]

        def e3nn_conv(a, b, c, tp=tp):
            return torch.zeros(a.shape[0], tp.irreps_out.dim, device=a.device, dtype=a.dtype).index_add(
                0, edge_index[1], tp(a[edge_index[0]], b, c))

        backends = {
            "e3nn": e3nn_conv,
            "torch": lambda a, b, c, conv=conv: conv(a, b, c, edge_index),
            "triton": lambda a, b, c, conv=conv: conv_fused(conv, a, b, c, edge_index),
            "triton_half_paths": lambda a, b, c, conv=conv: conv_fused(conv, a, b, c, edge_index, path_mask=half),
        }
        cueq, why = cueq_fused_conv(tp)
        if cueq is not None:
            backends["cueq_fused"] = lambda a, b, c, m=cueq: m(a, b, c, edge_index)
        # parity in the same run: triton vs the torch back end
        try:
            with torch.no_grad():
                ref = conv(x, sh, w, edge_index)
                ours = conv_fused(conv, x, sh, w, edge_index)
            checks.append({"case": size, "layer": f"conv{li}", "dtype": "float32",
                           "rel_err_triton_vs_torch": ((ours - ref).abs().max() / ref.abs().max()).item()})
        except Exception as exc:
            checks.append({"case": size, "layer": f"conv{li}", "error": repr(exc)})
        floor_bytes = conv_bytes(conv, n_nodes, e)
        for mode in MODES:
            row = {"case": size, "op": f"conv{li}", "mode": mode, "edges": e, "nodes": n_nodes,
                   "paths": len(conv.paths), "fwd_bytes_min": floor_bytes, "ms": {}}
            for name, f in backends.items():
                row["ms"][name] = measure(lambda f=f: run_mode(f, (x, sh, w), mode), args)
            if cueq is None:
                row["ms"]["cueq_fused"] = why
            results.append(row)
            print(json.dumps(row), flush=True)


def bench_element_linear(model, size, n_nodes, args, results):
    from sparsekern.kernels.triton import element_linear_layer

    g = torch.Generator(device=DEV).manual_seed(1)
    present = torch.randperm(89, device=DEV, generator=g)[:10]  # a 10-element system
    species = present[torch.randint(0, 10, (n_nodes,), device=DEV, generator=g)]
    for li, block in enumerate(model.interactions):
        fctp = block.skip_tp
        layer = ElementLinear.from_e3nn(fctp)
        x = torch.randn(n_nodes, layer.irreps_in.dim, device=DEV, generator=g)
        one_hot = torch.nn.functional.one_hot(species, layer.num_elements).float()
        T = 16
        deltas = []
        for p in layer.paths:  # 3 % of the 16 x 16 blocks active, W0 frozen
            shape = (layer.num_elements, math.ceil(p.mul_in / T), math.ceil(p.mul_out / T))
            active = (torch.rand(shape, device=DEV, generator=g) < 0.03).nonzero()
            slot = torch.full(shape, -1, dtype=torch.int32, device=DEV)
            slot[tuple(active.t())] = torch.arange(len(active), dtype=torch.int32, device=DEV)
            deltas.append((slot, torch.randn(len(active), T, T, device=DEV, generator=g) * 1e-2))
        w = layer.weight

        def with_delta(a, *vals):
            w.requires_grad_(False)  # sparse fine-tuning: only x and the active blocks
            try:
                return element_linear_layer(layer, a, species, [(s, v) for (s, _), v in zip(deltas, vals)])
            finally:
                w.requires_grad_(True)

        backends = {
            "e3nn": (lambda a: fctp(a, one_hot), (x,)),
            "torch": (lambda a: layer(a, one_hot), (x,)),
            "triton": (lambda a: element_linear_layer(layer, a, species), (x,)),
            "triton_delta3pct": (with_delta, (x, *[v for _, v in deltas])),
        }
        for mode in MODES[:2]:
            row = {"case": size, "op": f"skip_tp{li}", "mode": mode, "nodes": n_nodes, "ms": {}}
            for name, (f, inputs) in backends.items():
                row["ms"][name] = measure(lambda f=f, inputs=inputs: run_mode(f, inputs, mode), args)
            results.append(row)
            print(json.dumps(row), flush=True)


def measure(fn, args):
    try:
        return round(timed(fn, args.warmup, args.reps), 4)
    except Exception as exc:  # OOM, missing kernel support, ...
        torch.cuda.empty_cache()
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def fp64_parity(checks):
    """Small float64 check on the GPU: triton vs the torch back end, with second derivatives."""
    from sparsekern.kernels.triton import conv_fused

    model = mace_mp0_shaped("medium", dtype=torch.float64, num_elements=3).to(DEV)
    conv = ChannelwiseConv.from_e3nn(model.interactions[1].conv_tp)
    g = torch.Generator(device=DEV).manual_seed(2)
    n, e = 20, 200
    ins = [torch.randn(n, conv.irreps_in1.dim, device=DEV, dtype=torch.float64, generator=g),
           torch.randn(e, conv.irreps_in2.dim, device=DEV, dtype=torch.float64, generator=g),
           torch.randn(e, conv.weight_numel, device=DEV, dtype=torch.float64, generator=g)]
    ei = torch.randint(0, n, (2, e), device=DEV, generator=g)
    ours = run_mode(lambda a, b, c: conv_fused(conv, a, b, c, ei), ins, "fwd+bwd+dbl")
    ref = run_mode(lambda a, b, c: conv(a, b, c, ei), ins, "fwd+bwd+dbl")
    checks.append({"case": "fp64_dbl_backward", "layer": "conv1", "dtype": "float64",
                   "rel_err_triton_vs_torch": max(((a - b).abs().max() / b.abs().max()).item()
                                                  for a, b in zip(ours, ref))})


def markdown(meta, results, checks) -> str:
    names = []
    for r in results:
        names += [k for k in r["ms"] if k not in names]
    lines = [f"# GPU suite: {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, float32, median of {meta['reps']} runs (ms).", "",
             "| case | op | mode | " + " | ".join(names) + " | e3nn / triton | cueq / triton |",
             "|" + "---|" * (len(names) + 5)]
    for r in results:
        ms = r["ms"]
        cells = [f"{ms[n]:.3f}" if isinstance(ms.get(n), float) else str(ms.get(n, ""))[:3] for n in names]

        def ratio(a):
            x, y = ms.get(a), ms.get("triton")
            return f"{x / y:.2f}x" if isinstance(x, float) and isinstance(y, float) and y > 0 else "n/a"
        lines.append(f"| {r['case']} | {r['op']} | {r['mode']} | " + " | ".join(cells)
                     + f" | {ratio('e3nn')} | {ratio('cueq_fused')} |")
    notes = sorted({f"{n}: {v}" for r in results for n, v in r["ms"].items() if isinstance(v, str)})
    lines += ["", "Entries not measured (n/a) or failed (err):", ""] + [f"- {t}" for t in notes]
    lines += ["", "Forward bandwidth of the conv (compulsory bytes / triton time):", ""]
    for r in results:
        if r["op"].startswith("conv") and r["mode"] == "fwd" and isinstance(r["ms"].get("triton"), float):
            lines.append(f"- {r['case']} {r['op']}: {r['fwd_bytes_min'] / 1e9:.3f} GB, "
                         f"{r['fwd_bytes_min'] / r['ms']['triton'] / 1e6:.0f} GB/s")
    lines += ["", "Parity checks (same run):", ""] + [f"- {json.dumps(c)}" for c in checks]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the 300-atom case, fewer repetitions")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check that the script runs: CPU, TRITON_INTERPRET=1, tiny shapes, output to a temp dir")
    args = ap.parse_args()
    global DEV, SIZES
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("gpu_suite --cpu-smoke: set TRITON_INTERPRET=1")
        DEV, SIZES = "cpu", {"smoke_20at": (20, 60)}
        args.warmup, args.reps, args.out = 0, 1, tempfile.mkdtemp(prefix="gpu_suite_smoke_")
    elif not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA device; nothing measured, nothing written")
    if args.quick:
        args.reps = min(args.reps, 5)
    import triton

    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu smoke test (not a benchmark)", "date": now.isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "warmup": args.warmup, "reps": args.reps}
    results, checks = [], []
    model = mace_mp0_shaped("medium", dtype=torch.float32).to(DEV)
    sizes = {k: v for k, v in SIZES.items() if not args.quick or k != "mp0_medium_5000at"}
    for size, (n_nodes, n_edges) in sizes.items():
        for bench, extra in ((bench_conv, (n_nodes, n_edges)), (bench_element_linear, (n_nodes,))):
            try:
                bench(model, size, *extra, args, results, checks) if bench is bench_conv else \
                    bench(model, size, *extra, args, results)
            except Exception:
                checks.append({"case": size, "bench": bench.__name__, "error": traceback.format_exc()[-2000:]})
    try:
        fp64_parity(checks)
    except Exception:
        checks.append({"case": "fp64_dbl_backward", "error": traceback.format_exc()[-2000:]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_suite_{now.strftime('%Y%m%d_%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results, "checks": checks}, indent=1))
    stem.with_suffix(".md").write_text(markdown(meta, results, checks))
    print(markdown(meta, results, checks))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
