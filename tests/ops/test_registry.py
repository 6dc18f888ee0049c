"""The back-end registry: names, availability, what ``auto`` picks and its table."""

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
        rows = registry.update_auto_table("cuda", {"conv": ["torch", "triton"], "linear": ["triton"]})
        assert rows["conv"] == ["torch", "triton"] and rows["linear"] == ["triton", "torch"]
        assert json.loads(table.read_text())["cuda"]["element_linear"] == ["cuda", "triton", "torch"]
        assert registry._auto_table()["cuda"]["conv"] == ["torch", "triton"]
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
