"""``finetune/precompile.py``: on a GPU the fine-tuning run compiles its Triton kernels
before the first step, on a copy of the model. Here (CPU) the compile is replaced by a
stand-in that runs the recorded function for real: the run's results must be exactly
the uninterrupted reference's (nothing of the model, the optimizer or the random state
touched), and a failing compile must cost one line, not the run."""

import pytest


@pytest.fixture
def on_gpu(monkeypatch):
    """The run believes it launches compiled kernels; ``calls`` collects what precompile got."""
    calls = []

    def fake_precompile(run, workers=None, target=None):
        calls.append(run)
        run()  # everything the real one runs, launches included (on the CPU back end)
        return 0

    monkeypatch.setattr("sparsekern.finetune.precompile.compiles_kernels", lambda device: True)
    monkeypatch.setattr("sparsekern.ops.triton.precompile.precompile", fake_precompile)
    return calls


def test_precompile_changes_nothing(on_gpu, finetune_args, reference, result_difference, tmp_path):
    from sparsekern.cli import main

    out = tmp_path / "run"
    assert main(["finetune", *finetune_args(out)]) == 0
    assert len(on_gpu) == 1
    assert result_difference(out, reference) == 0.0


def test_failed_precompile_costs_one_line(on_gpu, monkeypatch, finetune_args, reference, result_difference,
                                          tmp_path, capsys):
    from sparsekern.cli import main

    def broken(run, workers=None, target=None):
        raise RuntimeError("precompile: 1 of 16 workers failed; the first said:\nTraceback ...")

    monkeypatch.setattr("sparsekern.ops.triton.precompile.precompile", broken)
    out = tmp_path / "run"
    assert main(["finetune", *finetune_args(out)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sparsekern: precompil")]
    assert said == ["sparsekern: precompiling the Triton kernels failed (RuntimeError: precompile: 1 of 16 "
                    "workers failed; the first said:); they compile on first use"], said
    assert result_difference(out, reference) == 0.0


def test_only_compiled_kernels_are_precompiled(monkeypatch):
    from sparsekern.finetune.precompile import compiles_kernels

    assert not compiles_kernels("cpu")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not compiles_kernels("cuda")  # the interpreter compiles nothing
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert compiles_kernels("cuda:0")
