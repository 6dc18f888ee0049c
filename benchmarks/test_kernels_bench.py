"""Kernel microbenchmarks with pytest-benchmark (GPU only; skipped without one):

    pytest benchmarks/test_kernels_bench.py --benchmark-json=bench.json [-k small_300at]

The cases of ``gpu_cases.py`` (MACE-MP-0-medium layers on 5,000 atoms / 150,000 edges
and on 300 atoms, float32), each back end forward and forward+backward. Each round ends
with a device synchronisation, so a round's wall time is the step's device time plus
one launch latency. ``gpu_suite.py`` times the same cases with CUDA events.
"""
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("kernel benchmarks need a CUDA GPU", allow_module_level=True)
pytest.importorskip("pytest_benchmark")
pytest.importorskip("mace")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_cases import OPS, SIZES, build_case, model, run_mode  # noqa: E402

DEV = "cuda"
BACKENDS = ("e3nn", "torch", "triton", "triton_delta3pct", "triton_half_paths", "cueq_fused")
# one flat list in (size, op) order, so each case is built once and dropped after its tests
PARAMS = [(s, o, b, m) for s in SIZES for o in OPS for b in BACKENDS for m in ("fwd", "fwd+bwd")]
_current = {}


def _case(size, op):
    if "model" not in _current:
        _current["model"] = model(smoke=False).to(DEV)
    if _current.get("key") != (size, op):
        _current.pop("case", None)  # free the previous case's GPU memory first
        _current["case"] = build_case(op, _current["model"], *SIZES[size], DEV)
        _current["key"] = (size, op)
    return _current["case"]


@pytest.mark.gpu
@pytest.mark.parametrize("size,op,backend,mode", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_kernel(benchmark, size, op, backend, mode):
    case = _case(size, op)
    b = case.backends.get(backend)
    if b is None:
        pytest.skip(f"{op} has no {backend} variant")
    if isinstance(b, str):
        pytest.skip(f"{op} {backend}: {b}")
    f, inputs = b
    benchmark.group = f"{size} {op} {mode}"
    benchmark.extra_info["device"] = torch.cuda.get_device_name()  # (the JSON's machine info is the host's)

    def step():
        run_mode(f, inputs, mode)
        if DEV == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, warmup_rounds=2, rounds=10, iterations=1)
