"""``ops/triton/precompile.py``: the kernels a model launches, compiled in parallel
processes for a GPU target, are exactly the ones its launches then look up (every
specialisation a cache hit), that a batch of other node and edge counts launches the same
specialisations, and that recording leaves the launcher as it was.

Triton's real front end is needed (not the interpreter conftest.py selects), so the check
runs this file as a script in a subprocess without TRITON_INTERPRET, for sm_90 on the CPU,
with a fresh cache directory. The launches are a small MACE-shaped conv and irrep linear,
forward and backward (generated and table-driven kernels)."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _passes(device="cpu", n=5, e=12):
    """A small MACE-shaped conv and irrep linear, forward and backward, with node
    features that need a gradient and (as MACE's first layer) without: ``n`` nodes, ``e``
    edges (on the CPU: the launches recorded, never run)."""
    import dataclasses

    import torch

    from sparsekern.layers import ChannelwiseConv, IrrepsLinear
    from sparsekern.ops import registry

    if device == "cpu":
        registry.BACKENDS["triton"] = dataclasses.replace(registry.BACKENDS["triton"], available=lambda d: True)
    torch.manual_seed(0)
    conv = ChannelwiseConv("4x0e+4x1o", "0e+1o", "4x0e+4x1o+4x1o+4x0e",
                           [(0, 0, 0, "uvu", True), (0, 1, 1, "uvu", True), (1, 0, 2, "uvu", True),
                            (1, 1, 3, "uvu", True)]).set_backend("triton")
    lin = IrrepsLinear("16x0e+16x1o+16x1o", "16x0e+16x1o").set_backend("triton")
    conv, lin = conv.to(device), lin.to(device)
    x = torch.randn(n, conv.irreps_in1.dim, device=device, requires_grad=True)
    sh = torch.randn(e, conv.irreps_in2.dim, device=device, requires_grad=True)
    w = torch.randn(e, conv.weight_numel, device=device, requires_grad=True)
    edge_index = torch.randint(0, n, (2, e), device=device)
    h = torch.randn(n, lin.irreps_in.dim, device=device, requires_grad=True)

    def run():
        conv(x, sh, w, edge_index).sum().backward()
        conv(x.detach(), sh, w, edge_index).sum().backward()
        lin(h).sum().backward()
    return run


def main() -> None:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from sparsekern import precompile
    from sparsekern.ops.triton.precompile import recording, specialisations

    launcher, target, run = JITFunction.run, GPUTarget("cuda", 90, 32), _passes()
    n = precompile(run, workers=2, target=target)
    with recording() as launches:
        run()
    specs = specialisations(launches, target)
    hits = []
    knobs.compilation.listener = lambda cache_hit, **_: hits.append(cache_hit)
    for spec in specs:
        triton.compile(spec.source(), target=target, options=spec.options)
    with recording() as other:  # another batch: odd counts (the edges' second row at another alignment)
        _passes(n=7, e=13)()
    same = {_key(s) for s in specs} == {_key(s) for s in specialisations(other, target)}
    print(json.dumps(dict(kernels=sorted({s.name for s in specs}), compiled=n, specs=len(specs), hits=hits,
                          launcher_restored=JITFunction.run is launcher, other_sizes_same=same)))


def _key(spec) -> str:
    return repr((spec.name, spec.signature, sorted(spec.bound_constexprs.items()), spec.attrs))


@pytest.mark.gpu_proxy
def test_precompiled_kernels_are_cache_hits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=_ROOT)
        assert run.returncode == 0, run.stderr[-4000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert len(os.listdir(cache)) >= out["specs"]  # each compiled once, by a worker
    print(out)
    assert {"_conv_kernel", "_edge_kernel", "_grads_kernel", "_lin_kernel", "_wgrad_kernel"} <= set(out["kernels"]), out
    assert out["compiled"] == out["specs"] and out["hits"] == [True] * out["specs"], out
    assert out["launcher_restored"] and out["other_sizes_same"], out


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_launches_find_precompiled_kernels(tmp_path, monkeypatch):
    """On a GPU, into a fresh cache: after precompile, the real launches compile nothing
    (each kernel they load is a cache hit; the generated conv kernels are new here)."""
    from triton import knobs

    from sparsekern import precompile

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    run = _passes("cuda")
    assert precompile(run, workers=4) >= 4
    hits = []
    monkeypatch.setattr(knobs.compilation, "listener", lambda cache_hit, **_: hits.append(cache_hit))
    run()
    assert hits and all(hits), hits


def test_refuses_what_cannot_compile(monkeypatch):
    """One-line errors before any work: under the interpreter (nothing would compile),
    and without a GPU or a target to compile for."""
    from sparsekern import precompile

    ran = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET is set"):
        precompile(lambda: ran.append(1))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device here; pass target="):
        precompile(lambda: ran.append(1))
    assert not ran


if __name__ == "__main__":
    sys.path.insert(0, _ROOT)  # this checkout's sparsekern, not an installed one
    import sparsekern  # noqa: F401  (lets e3nn 0.4.4 import under torch >= 2.6)

    main()
