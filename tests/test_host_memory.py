"""keep_freed_memory: a freed large tensor stays in the heap for the next one."""

import os
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, sys, torch
import sparsekern
kept = sparsekern.keep_freed_memory() if sys.argv[1] == "keep" else None

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
x = torch.ones(16 << 20)  # 64 MiB, above any threshold glibc adapts to by itself
mapped = mallinfo2().hblkhd  # bytes in blocks mapped one by one (unmapped when freed)
del x
print(kept, mapped, mallinfo2().fordblks)  # and the free bytes the heap keeps
"""
_TENSOR = 64 << 20


def _probe(mode: str, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**environ, **env}, capture_output=True,
                         text=True, check=True)
    kept, mapped, free = out.stdout.split()[-3:]
    return kept, int(mapped), int(free)


def test_freed_tensors_stay_in_the_heap():
    """glibc's state, not page faults (which a VM's memory reclaim can add): by default the
    tensor is a block of its own, unmapped when freed; kept, it comes from the heap and
    stays there, free for the next one."""
    _, mapped, free = _probe("default")
    assert mapped >= _TENSOR and free < _TENSOR
    kept, mapped, free = _probe("keep")
    assert kept == "True" and mapped < _TENSOR and free >= _TENSOR


def test_environment_settings_left_alone():
    assert _probe("keep", MALLOC_TRIM_THRESHOLD_="1000000")[0] == "False"
    assert _probe("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")[0] == "False"


def test_trainer_keeps_freed_memory_on_cpu(monkeypatch, tmp_path):
    """The trainer sets it once it knows the device, before the run's work (stopped there)."""
    from sparsekern.finetune import trainer
    from sparsekern.finetune.settings import Settings

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(trainer, "_held", lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(trainer, "check", lambda s: (None, None, tmp_path))
    with pytest.raises(RuntimeError, match="stop"):
        trainer.run(Settings(model="7net-0", train="t.xyz", test="t.xyz", method="sparse", out=str(tmp_path)))
    assert calls == [1]
