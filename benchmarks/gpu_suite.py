"""The whole GPU suite in one call: ``python benchmarks/gpu_suite.py [--quick]``
(``benchmarks/run_gpu.sh`` installs, builds, tests and then runs this).

1. The device's two ceilings, measured here: bandwidth of a large device-to-device copy
   (bytes read + written) and the float32 matrix-product rate (no TF32, as the kernels
   run float32 for 1e-5 parity).
2. Kernels (``gpu_cases.py``): conv, skip_tp, irrep linear and symmetric contraction of
   a MACE-MP-0-medium-shaped model on 5,000 atoms / 150,000 edges and 300 atoms / 9,000
   edges, float32; e3nn vs the torch back end vs Triton (dense, 3 % block-sparse delta,
   half the conv paths, the conv's edges listed by receiver) vs cuEquivariance's and
   OpenEquivariance's fused convs where they import (``--backends`` keeps some); fwd,
   fwd+bwd and (conv, contraction) fwd+bwd+dbl. Each forward's time is set against its
   floor (compulsory bytes / measured bandwidth, FLOPs / measured rate).
3. Parity in the same run (every back end computing the same function vs the torch
   back end, float32; conv second derivatives in float64).
4. End to end (``gpu_e2e.py``): energy + forces and one fine-tuning step, e3nn vs
   sparsekern full vs sparsekern sparse (density 0.03) vs MACE's cuEquivariance model.
5. Profiles (``torch.profiler``, device time): the top kernels of conv1, skip_tp1 and
   linear1 (Triton, fwd+bwd, large system) and of one sparse fine-tuning step; host time:
   the ops of sparsekern's energy+forces (``auto``) with the most CPU time of their own.

Every entry is measured here; an entry that fails records its error and the suite goes
on. Results are rewritten (atomically) after each section, so a run cut short keeps
what it measured: ``<out>/gpu_suite_<date>.json`` and ``.md``, with the device and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_cases  # noqa: E402
import gpu_e2e  # noqa: E402
from gpu_cases import OPS, SIZES, SMOKE_SIZES, build_case, parity_errors, run_mode  # noqa: E402

import sparsekern  # noqa: E402,F401
from sparsekern.layers import ChannelwiseConv  # noqa: E402
from sparsekern.ops import registry  # noqa: E402

DEV = "cuda"  # "cpu" only for --cpu-smoke (TRITON_INTERPRET=1, tiny shapes, not a benchmark)


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


def measure(fn, args):
    try:
        return round(timed(fn, args.warmup, args.reps), 4)
    except Exception as exc:  # OOM, missing kernel support, ...
        if DEV == "cuda":
            torch.cuda.empty_cache()
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def ceilings(args) -> dict:
    """Measured: copy bandwidth (GB/s, read + written) and float32 GEMM rate (GFLOP/s)."""
    n = (1 << 28) if DEV == "cuda" else (1 << 12)  # 1 GiB of float32 on the GPU
    a = torch.empty(n, device=DEV, dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), args.warmup, args.reps)
    del a, b
    k = 8192 if DEV == "cuda" else 64
    x, y = torch.randn(k, k, device=DEV), torch.randn(k, k, device=DEV)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        mm = timed(lambda: x @ y, args.warmup, args.reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"copy_GBps": 2 * 4 * n / ms / 1e6, "fp32_gemm_GFLOPs": 2 * k ** 3 / mm / 1e6}


def floor_ms(floor: dict, ceil: dict) -> float:
    return max(floor.get("bytes", 0) / ceil["copy_GBps"] / 1e6, floor.get("flops", 0) / ceil["fp32_gemm_GFLOPs"] / 1e6)


PROFILED = ("conv1", "skip_tp1", "linear1")


def profile_top(fn, n: int = 8, host: bool = False) -> list:
    """The ``n`` device kernels of ``fn`` (run 3 times after a warm-up) with the most
    device time: name, calls per run and microseconds per run; with ``host``, the ``n``
    ops with the most host time of their own (self CPU time: the dispatch an eager call
    waits on), ``n`` doubled."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU if host else ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    time_of = (lambda e: e.self_cpu_time_total) if host else (lambda e: e.device_time_total)
    rows = sorted((e for e in prof.key_averages() if time_of(e) > 0), key=lambda e: -time_of(e))
    return [{"kernel": e.key[:90], "calls": e.count / 3, "us": round(time_of(e) / 3, 1)}
            for e in rows[:2 * n if host else n]]


def profile_into(profiles: list, name: str, fn, host: bool = False) -> None:
    if DEV != "cuda":
        return
    try:
        profiles.append({"what": name, "host": host, "top": profile_top(fn, host=host)})
    except Exception as exc:
        profiles.append({"what": name, "error": f"{type(exc).__name__}: {exc}"[:300]})


def precompile_cases(size: str, cases: dict, checks: list) -> None:
    """The Triton kernels of every mode of the cases' Triton back ends, compiled at once
    in parallel processes before the timings (whose warm-ups would compile them one by
    one); a failure is recorded and the warm-ups compile them instead."""
    t0 = time.time()
    runs = [(b, case.modes) for case in cases.values() for name, b in case.backends.items()
            if name.startswith("triton") and not isinstance(b, str)]
    try:
        n = sparsekern.precompile(lambda: [run_mode(f, ins, mode) for (f, ins), modes in runs for mode in modes])
    except Exception as exc:
        checks.append({"case": size, "check": "precompile", "error": repr(exc)[:1000]})
        return
    print(f"[{size}] {n} Triton kernel specialisations compiled in {time.time() - t0:.0f} s", flush=True)
    checks.append({"case": size, "check": "precompile", "specs": n, "s": round(time.time() - t0, 1)})


def bench_kernels(model, size, n_nodes, n_edges, ops, args, ceil, results, checks, profiles):
    cases = {}
    for op in ops:
        try:
            keep = args.backends.split(",") if args.backends else None
            cases[op] = build_case(op, model, n_nodes, n_edges, DEV, keep)
        except Exception:
            checks.append({"case": size, "op": op, "error": traceback.format_exc()[-1500:]})
    if DEV == "cuda":
        precompile_cases(size, cases, checks)
    for op in list(cases):
        case = cases.pop(op)
        try:
            checks.append({"case": size, "op": op, "dtype": "float32", "reference": case.reference,
                           "rel_err": parity_errors(case)})
        except Exception as exc:
            checks.append({"case": size, "op": op, "reference": case.reference, "error": repr(exc)[:300]})
        for mode in case.modes:
            row = {"case": size, "op": op, "mode": mode, "nodes": n_nodes, "edges": n_edges,
                   "fwd_floor": case.floor, "fwd_floor_ms": floor_ms(case.floor, ceil), "ms": {}}
            for name, b in case.backends.items():
                row["ms"][name] = b if isinstance(b, str) else measure(
                    lambda f=b[0], ins=b[1]: run_mode(f, ins, mode), args)
            results.append(row)
            print(json.dumps(row), flush=True)
        if op in PROFILED and size == next(iter(SIZES)) and not isinstance(case.backends.get("triton", ""), str):
            f, ins = case.backends["triton"]
            profile_into(profiles, f"{op} {size} triton fwd+bwd", lambda: run_mode(f, ins, "fwd+bwd"))
        del case
        if DEV == "cuda":
            torch.cuda.empty_cache()


def fp64_parity(model, checks):
    """Small float64 check on the device: triton vs the torch back end, second derivatives."""
    from sparsekern.ops.triton.conv import conv as triton_conv

    conv = ChannelwiseConv.from_e3nn(model.interactions[1].conv_tp)
    g = torch.Generator(device=DEV).manual_seed(2)
    n, e = 20, 200
    ins = [torch.randn(n, conv.irreps_in1.dim, device=DEV, dtype=torch.float64, generator=g),
           torch.randn(e, conv.irreps_in2.dim, device=DEV, dtype=torch.float64, generator=g),
           torch.randn(e, conv.weight_numel, device=DEV, dtype=torch.float64, generator=g)]
    ei = torch.randint(0, n, (2, e), device=DEV, generator=g)
    ours = run_mode(lambda a, b, c: triton_conv(conv.desc, a, b, c, ei), ins, "fwd+bwd+dbl")
    ref = run_mode(lambda a, b, c: conv(a, b, c, ei), ins, "fwd+bwd+dbl")
    checks.append({"case": "fp64_dbl_backward", "op": "conv1", "dtype": "float64",
                   "rel_err": max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))})


# the suite's op names -> the registry's
REGISTRY_OP = {"conv": "conv", "skip_tp": "element_linear", "linear": "linear", "products": "symmetric_contraction"}


def auto_orders(results) -> dict:
    """Per registry op, the back ends measured on every row, fastest total first; for an
    op measured at several numbers of atoms (``registry.SIZED_OPS``), one such order per
    number (what ``auto`` then chooses from by each call's atoms)."""
    totals, rows = {}, {}
    for r in results:
        op = REGISTRY_OP.get(r["op"].rstrip("0123456789"))
        if op is None:
            continue
        key = (op, r["nodes"])
        rows[key] = rows.get(key, 0) + 1
        for name, ms in r["ms"].items():
            if name in registry.BACKENDS and isinstance(ms, float):
                t = totals.setdefault(key, {}).setdefault(name, [0.0, 0])
                t[0] += ms
                t[1] += 1
    orders = {key: sorted((n for n, (_, k) in by.items() if k == rows[key]), key=lambda n: by[n][0])
              for key, by in totals.items()}
    out = {}
    for op in dict.fromkeys(op for op, _ in orders):
        sized = {str(atoms): order for (o, atoms), order in sorted(orders.items()) if o == op}
        out[op] = sized if len(sized) > 1 and op in registry.SIZED_OPS else sized[max(sized, key=int)]
    return out


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("n/a" if str(v).startswith("n/a") else "err" if v else "")


def markdown(meta, results, checks, profiles=()) -> str:
    ceil = meta.get("ceilings", {})
    lines = [f"# GPU suite: {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; float32; median of "
             f"{meta['reps']} runs after {meta['warmup']} warm-ups, CUDA events (ms). Measured ceilings: "
             f"copy {ceil.get('copy_GBps', 0):.0f} GB/s (read + write), float32 GEMM "
             f"{ceil.get('fp32_gemm_GFLOPs', 0) / 1e3:.1f} TFLOP/s.", ""]
    kern = [r for r in results if not r["case"].startswith("e2e")]
    names = []
    for r in kern:
        names += [k for k in r["ms"] if k not in names]
    lines += ["## Kernels", "",
              "| case | op | mode | " + " | ".join(names)
              + " | e3nn / triton | cueq / triton | oeq / triton | fwd floor (ms) | triton / floor |",
              "|" + "---|" * (len(names) + 8)]
    for r in kern:
        ms = r["ms"]

        def ratio(a, b="triton"):
            x, y = ms.get(a), ms.get(b)
            return f"{x / y:.2f}x" if isinstance(x, float) and isinstance(y, float) and y > 0 else "n/a"
        t = ms.get("triton")
        vs_floor = f"{t / r['fwd_floor_ms']:.1f}x" if r["mode"] == "fwd" and isinstance(t, float) else ""
        lines.append(f"| {r['case']} | {r['op']} | {r['mode']} | " + " | ".join(_fmt(ms.get(n, "")) for n in names)
                     + f" | {ratio('e3nn')} | {ratio('cueq_fused')} | {ratio('oeq_fused')} | {r['fwd_floor_ms']:.4f} | {vs_floor} |")
    e2e = [r for r in results if r["case"].startswith("e2e")]
    if e2e:
        lines += ["", f"## End to end ({meta.get('model', '')})", "",
                  "| case | variant | atoms | edges | energy+forces (ms) | energy+forces, CUDA graph (ms) "
                  "| energy+forces, GraphedMACE (ms) | fine-tuning step (ms) | step, CUDA graph (ms) "
                  "| step speed-up vs e3nn |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            base = next((b["ms"]["finetune_step"] for b in e2e if b["mode"] == "e3nn" and b["case"] == r["case"]), None)
            s = r["ms"]["finetune_step"]
            up = f"{base / s:.2f}x" if isinstance(base, float) and isinstance(s, float) else "n/a"
            lines.append(f"| {r['case']} | {r['mode']} | {r['nodes']} | {r['edges']} | "
                         f"{_fmt(r['ms']['energy+forces'])} | {_fmt(r['ms'].get('energy+forces (CUDA graph)', 'n/a'))} "
                         f"| {_fmt(r['ms'].get('energy+forces (GraphedMACE)', 'n/a'))} | {_fmt(s)} "
                         f"| {_fmt(r['ms'].get('finetune_step (CUDA graph)', 'n/a'))} | {up} |")
    notes = sorted({f"{n}: {v}" for r in results for n, v in r["ms"].items() if isinstance(v, str)})
    lines += ["", "Entries not measured (n/a) or failed (err):", ""] + [f"- {t}" for t in notes]
    lines += ["", "Parity checks and errors (same run):", ""] + [f"- {json.dumps(c)}" for c in checks]
    for p in profiles:
        lines += ["", f"## Profile: {p['what']} ({'host time of its own' if p.get('host') else 'device time'} "
                  "per run)", ""]
        lines += [p["error"]] if "error" in p else (
            [f"| {'op' if p.get('host') else 'kernel'} | calls | us |", "|---|---|---|"]
            + [f"| `{k['kernel']}` | {k['calls']:g} | {k['us']:.1f} |" for k in p["top"]])
    return "\n".join(lines) + "\n"


def print_floors(gbps: float, gflops: float) -> None:
    model = gpu_cases.model(False)
    print(f"computed forward floors, float32, at {gbps:.0f} GB/s and {gflops / 1e3:.1f} TFLOP/s (not measured)")
    print("| case | op | MB | GFLOP | FLOP/B | bytes time (us) | FLOP time (us) |")
    print("|---|---|---|---|---|---|---|")
    for size, (n_nodes, n_edges) in SIZES.items():
        for op in OPS:
            f = gpu_cases.op_floor(op, model, n_nodes, n_edges)
            print(f"| {size} | {op} | {f['bytes'] / 1e6:.1f} | {f['flops'] / 1e9:.3f} | {f['flops'] / f['bytes']:.1f} | "
                  f"{f['bytes'] / gbps / 1e3:.1f} | {f['flops'] / gflops / 1e3:.1f} |")


def provenance() -> dict:
    """The tree the run measured (its git revision, and whether it had changes) and the
    cuda rows ``auto`` read at its start (the end-to-end rows' ``auto`` back ends)."""
    import subprocess

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return None

    return {"git": git("rev-parse", "HEAD"), "git_changes": git("status", "--porcelain", "--untracked-files=no"),
            "auto_table_cuda": json.loads(registry.AUTO_TABLE.read_text()).get("cuda")}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the 300-atom case, fewer repetitions")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--e2e-atoms", default="5000,64",
                    help="comma-separated system sizes of the end-to-end runs, in order (0: none)")
    ap.add_argument("--kernel-sizes", default=",".join(SIZES),
                    help=f"comma-separated subset of {','.join(SIZES)} (empty: no kernel rows)")
    ap.add_argument("--backends", default="",
                    help="comma-separated back ends to time (default: all of each case's), e.g. "
                         "triton,cueq_fused,oeq_fused")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--update-auto", action="store_true",
                    help="rewrite the cuda rows of sparsekern/ops/auto.json (what backend='auto' picks) "
                         "from this run: per op, back ends by total time over every case and mode")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check that the script runs: CPU, TRITON_INTERPRET=1, tiny shapes, output to a temp dir")
    ap.add_argument("--floors", metavar="GBPS,GFLOPS",
                    help="print each op's computed forward floor on the MP-0-medium shapes at this bandwidth "
                         "(GB/s) and float32 rate (GFLOP/s), e.g. 3000,67000; runs nothing on a device")
    args = ap.parse_args()
    if args.floors:
        print_floors(*(float(v) for v in args.floors.split(",")))
        return
    global DEV
    ops = [o for o in args.ops.split(",") if o]
    if any(o not in OPS for o in ops):
        sys.exit(f"gpu_suite: unknown op in --ops {args.ops!r}; expected some of {','.join(OPS)}")
    names = [k for k in args.kernel_sizes.split(",") if k]
    if any(k not in SIZES for k in names):
        sys.exit(f"gpu_suite: unknown size in --kernel-sizes {args.kernel_sizes!r}; expected some of {','.join(SIZES)}")
    sizes = {k: v for k, v in SIZES.items() if k in names}
    try:
        e2e_atoms = [int(n) for n in args.e2e_atoms.split(",") if n and int(n) > 0]
    except ValueError:
        sys.exit(f"gpu_suite: --e2e-atoms takes comma-separated atom counts, got {args.e2e_atoms!r}")
    if any(b not in gpu_cases.BACKENDS for b in args.backends.split(",") if b):
        sys.exit(f"gpu_suite: unknown back end in --backends {args.backends!r}; expected some of "
                 f"{','.join(gpu_cases.BACKENDS)}")
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("gpu_suite --cpu-smoke: set TRITON_INTERPRET=1")
        DEV, sizes = "cpu", (SMOKE_SIZES if sizes else {})
        args.warmup, args.reps, args.out = 0, 1, tempfile.mkdtemp(prefix="gpu_suite_smoke_")
        e2e_atoms = [min(n, 8) for n in e2e_atoms]
    elif not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA device; nothing measured, nothing written")
    if args.quick:
        args.reps = min(args.reps, 5)
        sizes = {k: v for k, v in sizes.items() if k != "mp0_medium_5000at"}
    import triton

    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu smoke test (not a benchmark)",
            "date": now.isoformat(timespec="seconds"), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda, "warmup": args.warmup,
            "reps": args.reps, "command": " ".join(sys.argv),
            "model": "tiny smoke model" if args.cpu_smoke else "MACE-MP-0-medium shape, random weights",
            **provenance()}
    results, checks, profiles = [], [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_suite_{now.strftime('%Y%m%d_%H%M%S')}"

    def save():
        write_atomic(stem.with_suffix(".json"), json.dumps({"meta": meta, "results": results, "checks": checks,
                                                            "profiles": profiles}, indent=1))
        write_atomic(stem.with_suffix(".md"), markdown(meta, results, checks, profiles))

    def update_auto():  # after each kernel size: a run the device tool stops keeps what it measured
        if args.update_auto and DEV == "cuda":
            source = f"{meta['device']}, {meta['date']}: {meta['command']} ({stem.name}.md)"
            print(f"auto table: {registry.update_auto_table('cuda', auto_orders(results), source)}", flush=True)

    meta["ceilings"] = ceilings(args)
    print(json.dumps(meta), flush=True)
    # the large system's kernels and the end-to-end runs first: a run cut short by the
    # device tool's limit loses the small system's kernels only
    first = [k for k in sizes if k != "small_300at"]
    model = gpu_cases.model(args.cpu_smoke).to(DEV)
    for size, (n_nodes, n_edges) in sizes.items():
        if size not in first:
            continue
        print(f"== suite: kernels {size}", flush=True)
        bench_kernels(model, size, n_nodes, n_edges, ops, args, meta["ceilings"], results, checks, profiles)
        save()
        update_auto()
    for i, n_atoms in enumerate(e2e_atoms):
        e2e_args = argparse.Namespace(warmup=min(args.warmup, 2), reps=min(args.reps, 5))
        print(f"== suite: end to end, {n_atoms} atoms", flush=True)
        try:  # profiles of the first size only
            gpu_e2e.run(gpu_cases.model(args.cpu_smoke).to(DEV), n_atoms, DEV,
                        lambda fn: measure(fn, e2e_args), results, checks,
                        (lambda name, fn, host=False: profile_into(profiles, name, fn, host)) if i == 0 else None,
                        on_row=save)
        except Exception:
            checks.append({"case": f"e2e_{n_atoms}", "error": traceback.format_exc()[-2000:]})
        save()
    try:
        fp64_parity(gpu_cases.model(args.cpu_smoke, torch.float64).to(DEV), checks)
    except Exception:
        checks.append({"case": "fp64_dbl_backward", "error": traceback.format_exc()[-2000:]})
    for size, (n_nodes, n_edges) in sizes.items():
        if size in first:
            continue
        print(f"== suite: kernels {size}", flush=True)
        bench_kernels(model, size, n_nodes, n_edges, ops, args, meta["ceilings"], results, checks, profiles)
        save()
        update_auto()
    save()
    print(markdown(meta, results, checks, profiles))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
