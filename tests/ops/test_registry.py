"""The back-end registry: names, availability, what ``auto`` picks and its table."""

import copy
import json
import shutil

import pytest
import torch

from sparsekern.ops import registry

CPU = torch.device("cpu")


def test_auto_on_cpu_is_the_torch_reference():
    assert all(registry.resolve("auto", op, CPU) == "torch" for op in registry.OPS)


def test_explicit_back_ends():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; expected one of \('auto', 'torch'"):
        registry.resolve("tpu", "conv", CPU)
    with pytest.raises(RuntimeError, match="'cuda' is not available on cpu .*compiled extension"):
        registry.resolve("cuda", "element_linear", CPU)
    assert registry.resolve("torch", "conv", CPU) == "torch"
    if registry.BACKENDS["triton"].available(CPU):  # the interpreter (tests/conftest.py)
        assert registry.resolve("triton", "conv", CPU) == "triton"
        assert registry.resolve("triton", "radial_mlp", CPU) == "torch"  # no kernel: the reference


def test_every_op_has_its_implementations():
    for op in registry.OPS:
        assert callable(registry.implementation(op, "torch"))
    with pytest.raises(ValueError, match="does not implement 'radial_mlp'"):
        registry.implementation("radial_mlp", "triton")


def test_benchmarks_rewrite_the_auto_table(tmp_path, monkeypatch):
    table = tmp_path / "auto.json"
    shutil.copy(registry.AUTO_TABLE, table)
    monkeypatch.setattr(registry, "AUTO_TABLE", table)
    registry._auto_table.cache_clear()
    try:
        rows = registry.update_auto_table("cuda", {"conv": ["torch", "triton"], "linear": ["triton"]}, "run A")
        # (cuEquivariance, which the run did not time, keeps its place in the largest size's order)
        assert rows["conv"] == ["cueq", "torch", "triton"] and rows["linear"] == ["triton", "torch"]
        assert json.loads(table.read_text())["cuda"]["element_linear"] == ["cuda", "triton", "torch"]
        # a run that did not time the CUDA element linear keeps it where it was (it dropped it)
        rows = registry.update_auto_table("cuda", {"element_linear": ["torch", "triton"]}, "run B")
        assert rows["element_linear"] == ["cuda", "torch", "triton"]
        assert json.loads(table.read_text())["rewritten"]["cuda"][:2] == ["run B", "run A"]
        assert registry._auto_table()["cuda"]["conv"] == ["cueq", "torch", "triton"]
        # one order becoming one per size, a new size, and back: untimed back ends keep their places
        rows = registry.update_auto_table("cuda", {"element_linear": {"300": ["triton", "torch"],
                                                                      "5000": ["torch", "triton"]}})
        assert rows["element_linear"] == {"300": ["cuda", "triton", "torch"], "5000": ["cuda", "torch", "triton"]}
        rows = registry.update_auto_table("cuda", {"element_linear": {"50000": ["triton", "torch"]}})
        assert rows["element_linear"] == {"50000": ["cuda", "triton", "torch"]}
        rows = registry.update_auto_table("cuda", {"element_linear": ["torch", "triton"]})
        assert rows["element_linear"] == ["cuda", "torch", "triton"]
        with pytest.raises(ValueError, match="cannot run on"):
            registry.update_auto_table("cuda", {"radial_mlp": ["triton"]})
    finally:
        registry._auto_table.cache_clear()


@pytest.mark.parametrize("ops_installed", [True, False])
def test_cueq_on_a_gpu_needs_its_kernels(monkeypatch, ops_installed):
    """Without cuequivariance-ops-torch, cuEquivariance runs its pure-torch method: on a GPU
    that is not the back end whose kernels ``auto``'s timings measured."""
    import importlib.util
    import sys
    import types

    monkeypatch.setitem(sys.modules, "cuequivariance_torch", types.ModuleType("cuequivariance_torch"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if ops_installed else None) if name == "cuequivariance_ops_torch" else find_spec(name, *a)))
    available = registry._cueq_available.__wrapped__  # past the per-device cache
    assert available(CPU)
    assert available(torch.device("cuda")) == ops_installed


@pytest.fixture
def table(tmp_path, monkeypatch):
    """The auto table as a file of the test's own, read afresh."""
    path = tmp_path / "auto.json"
    shutil.copy(registry.AUTO_TABLE, path)
    monkeypatch.setattr(registry, "AUTO_TABLE", path)
    registry._auto_table.cache_clear()
    yield path
    registry._auto_table.cache_clear()


def test_auto_by_the_calls_atoms(table):
    """A row with an order per number of atoms: each call runs on the order of the size
    nearest its atoms in log (here up to sqrt(2 x 50) = 10 atoms, Triton), whatever the
    layer was patched for; other ops keep one order; the layer says so."""
    if not registry.BACKENDS["triton"].available(CPU):
        pytest.skip("the Triton interpreter is off")
    from sparsekern.layers import ChannelwiseConv
    from helpers import rel_err, uvu_tp

    registry.update_auto_table("cpu", {"conv": {"2": ["triton"], "50": ["torch"]}})
    sized = registry.by_atoms("auto", "conv", CPU)
    assert sized.bounds == pytest.approx((10.0,)) and [sized(n) for n in (1, 10, 11, 500)] == ["triton"] * 2 + [
        "torch"] * 2
    assert registry.resolve("auto", "conv", CPU) == "torch"  # the largest size's, without a call's atoms
    assert registry.by_atoms("auto", "linear", CPU) is None and registry.by_atoms("torch", "conv", CPU) is None

    from e3nn import o3

    irreps1, irreps2 = o3.Irreps("4x0e+4x1o"), o3.Irreps("0e+1o")
    ref = uvu_tp(irreps1, irreps2, irreps1)
    conv = ChannelwiseConv.from_e3nn(ref).use_backend("auto", CPU)
    assert "backend=auto: triton up to 10 atoms, torch above" in repr(conv)
    ran = []
    real = registry.implementation
    with pytest.MonkeyPatch.context() as m:
        m.setattr(registry, "implementation", lambda op, backend: ran.append(backend) or real(op, backend))
        for nodes in (4, 30):
            x, edges = torch.randn(nodes, irreps1.dim, dtype=torch.float64), torch.randint(0, nodes, (2, 3 * nodes))
            sh, w = torch.randn(3 * nodes, irreps2.dim, dtype=torch.float64), torch.randn(3 * nodes, ref.weight_numel,
                                                                                       dtype=torch.float64)
            want = torch.zeros(nodes, ref.irreps_out.dim, dtype=torch.float64).index_add(0, edges[1],
                                                                                        ref(x[edges[0]], sh, w))
            assert rel_err(conv(x, sh, w, edges), want) <= 1e-12
    assert ran == ["triton", "torch"]
    assert conv.set_backend("torch").sized is None and "backend=torch" in repr(conv)
    registry.update_auto_table("cpu", {"conv": {"2": ["cueq", "triton"], "50": ["triton"]}})
    if not registry.BACKENDS["cueq"].available(CPU):  # the same back end at every size: no choice per call
        assert registry.by_atoms("auto", "conv", CPU) is None
    with pytest.raises(ValueError, match="takes one order, not one per number of atoms"):
        registry.update_auto_table("cpu", {"channelwise_tp": {"2": ["triton"]}})


def test_gpu_suite_orders_by_size():
    """``gpu_suite.py --update-auto``: an order per number of atoms where an op was
    measured at several, one order otherwise; back ends missing on a row are left out."""
    pytest.importorskip("mace")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from gpu_suite import auto_orders

    def row(op, nodes, **ms):
        return {"op": op, "nodes": nodes, "ms": ms}

    results = [row("conv0", 300, triton=1.0, cueq=2.0, e3nn=9.0), row("conv1", 300, triton=1.0, cueq=1.5),
               row("conv0", 5000, triton=5.0, cueq=2.0), row("conv1", 5000, triton=5.0, cueq=3.0, torch=9.0),
               row("products0", 5000, triton=1.0, cueq=2.0), row("linear0", 300, triton=2.0, torch=1.0)]
    assert auto_orders(results) == {"conv": {"300": ["triton", "cueq"], "5000": ["cueq", "triton"]},
                                    "symmetric_contraction": ["triton", "cueq"], "linear": ["torch", "triton"]}


def test_the_cuda_element_linear_needs_triton_too(monkeypatch):
    """Its weight gradient is Triton's kernel: without Triton the back end is not available."""
    import sys

    from sparsekern.ops.cuda import element_linear

    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(element_linear, "available", lambda: True)
    gpu = torch.device("cuda")
    assert registry._cuda_available(gpu)
    monkeypatch.setitem(sys.modules, "triton", None)  # (import triton raises ImportError)
    assert not registry._cuda_available(gpu)


def test_auto_follows_a_layer_to_another_device(monkeypatch):
    """A model patched on the CPU and moved to a GPU (here: meta) runs what auto picks
    there, not the CPU's choice; and back."""
    from sparsekern.layers import IrrepsLinear

    monkeypatch.setattr(registry, "_auto_table", lambda: {"cpu": {}, "meta": {"linear": ["triton", "torch"]}})
    layer = IrrepsLinear("3x0e+2x1o", "2x0e+1x1o").use_backend("auto", CPU)
    assert layer.backend == "torch"
    ran = []
    monkeypatch.setitem(registry._IMPLEMENTATIONS, ("linear", "triton"),
                        lambda desc, x, *a: ran.append(x.device.type) or x.new_zeros(len(x), desc.blocks_out.dim))
    moved = copy.deepcopy(layer).to("meta")
    moved(torch.randn(4, 9, device="meta"))
    assert moved.backend == "triton" and ran == ["meta"]
    layer.use_backend("auto", torch.device("meta"))(torch.randn(4, 9))  # (resolved there, called here)
    assert layer.backend == "torch" and ran == ["meta"]
