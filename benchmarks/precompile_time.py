"""First use of the Triton kernels: compiled one after another (as the launches do) or all
at once in parallel processes (``sparsekern.precompile``), for sm_90, on this machine's CPUs.

The workload is the sm_90 proxy's (tests/ops/test_gpu_proxy_aot.py): MACE-MP-0 medium,
float32, energy+forces, a full and a sparse (3 %) training step with forces in the loss,
27 atoms, every launch recorded instead of run. Each way compiles into a fresh Triton
cache directory. Compiling is CPU work, so the GPU machine's first step pays what this
measures there (its CPUs and Triton version).

    .venv-mace/bin/python benchmarks/precompile_time.py [--workers N]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, before anything imports triton


def _aot_proxy():
    spec = importlib.util.spec_from_file_location("aot", ROOT / "tests" / "ops" / "test_gpu_proxy_aot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: one per CPU)")
    args = parser.parse_args()
    import sparsekern  # noqa: F401  (e3nn 0.4.4 under torch >= 2.6)
    import triton
    from triton.backends.compiler import GPUTarget

    from sparsekern.ops.triton.precompile import compile_all, specialisations

    target = GPUTarget("cuda", 90, 32)
    specs = specialisations(_aot_proxy()._mace_launches("float32"), target)
    times = {}
    for way in ("one after another", f"{args.workers} processes"):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # read at each compile; the workers inherit it
            t0 = time.perf_counter()
            if way.endswith("processes"):
                compile_all(specs, target, args.workers)
            else:
                for spec in specs:
                    triton.compile(spec.source(), target=target, options=spec.options)
            times[way] = time.perf_counter() - t0
    print(f"{len(specs)} specialisations for sm_90, Triton {triton.__version__}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}):")
    for way, s in times.items():
        print(f"  {way}: {s:.1f} s")


if __name__ == "__main__":
    main()
