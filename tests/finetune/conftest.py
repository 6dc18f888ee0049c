"""A tiny fine-tuning case shared by the preemption and distributed tests: 5 training
frames in global batches of 2 (3 steps per epoch, the last of one frame, so a second
process gets none), 2 epochs, and the uninterrupted one-process run they compare with."""

import json

import pytest
import torch

ARGS = ("--method", "sparse", "--epochs", "2", "--batch_size", "2", "--lr", "0.02", "--no_progress")
COMPARED = ("test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A", "test_energy_rmse_mev_per_atom",
            "test_force_rmse_mev_per_A", "changed_fraction", "changed_params")


@pytest.fixture(scope="session")
def case(tmp_path_factory):
    pytest.importorskip("mace")
    from helpers import write_tiny_mace_case

    return write_tiny_mace_case(tmp_path_factory.mktemp("case"), n_train=5)


@pytest.fixture(scope="session")
def finetune_args(case):
    """``sparsekern finetune``'s arguments for the case, writing to ``out``."""
    def args(out, *extra):
        return ["--model", str(case / "tiny.model"), "--train", str(case / "train.xyz"),
                "--test", str(case / "test.xyz"), "--out", str(out), *ARGS, *extra]
    return args


@pytest.fixture(scope="session")
def reference(case, finetune_args):
    """The uninterrupted one-process run's folder."""
    from sparsekern.cli import main

    out = case / "reference"
    assert main(["finetune", *finetune_args(out)]) == 0
    return out


def _rel(a, b) -> float:
    from helpers import rel_err

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape
    return rel_err(a, b) if b.numel() else 0.0


@pytest.fixture(scope="session")
def result_difference():
    """The largest relative difference between two runs' results (folders): each adapter
    tensor, the compared test metrics, the per-epoch training losses (the same keys and
    epochs are required)."""
    from safetensors.torch import load_file

    def difference(out, reference) -> float:
        mine, theirs = load_file(out / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
        assert mine.keys() == theirs.keys()
        diffs = [_rel(mine[k], theirs[k]) for k in mine]
        m, r = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
        diffs += [_rel(m[k], r[k]) for k in COMPARED]
        assert [h["epoch"] for h in m["history"]] == [h["epoch"] for h in r["history"]] == [1, 2]
        diffs += [_rel(a["train_loss"], b["train_loss"]) for a, b in zip(m["history"], r["history"])]
        return max(diffs)
    return difference
