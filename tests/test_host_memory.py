"""keep_freed_memory: a freed large tensor's pages are reused, not faulted in again."""

import os
import subprocess
import sys

import pytest

_PROBE = """
import resource, sys, torch
import sparsekern
kept = sparsekern.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # warm-up: the heap grows to hold it
    x = torch.ones(16 << 20); del x  # 64 MiB, above any threshold glibc adapts to by itself
counts = []
for _ in range(5):
    before = faults()
    x = torch.ones(16 << 20); del x
    counts.append(faults() - before)
print(kept, sorted(counts)[2])  # the median: the VM's reclaim may fault a cold page back now and then
"""
_PAGES = (64 << 20) // 4096  # a 64 MiB tensor's pages


def _probe(mode: str, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**environ, **env}, capture_output=True,
                         text=True, check=True)
    kept, faults = out.stdout.split()[-2:]  # the median allocation's faults
    return kept, int(faults)


def test_freed_tensors_reused_without_page_faults():
    assert _probe("default")[1] > 0.9 * _PAGES  # each allocation maps fresh pages
    kept, faults = _probe("keep")
    assert kept == "True" and faults < 0.01 * _PAGES


def test_environment_settings_left_alone():
    assert _probe("keep", MALLOC_TRIM_THRESHOLD_="1000000")[0] == "False"
    assert _probe("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")[0] == "False"


def test_trainer_keeps_freed_memory_on_cpu(monkeypatch, tmp_path):
    """The trainer sets it once it knows the device, before the run's work (stopped there)."""
    from sparsekern.finetune import trainer

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(trainer, "_held", lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(trainer, "check", lambda s: (None, None, tmp_path))
    with pytest.raises(RuntimeError, match="stop"):
        trainer.run(trainer.Settings(model="7net-0", train="t.xyz", test="t.xyz", method="sparse", out=str(tmp_path)))
    assert calls == [1]
