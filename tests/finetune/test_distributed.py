"""Data-parallel fine-tuning on torch.distributed (gloo, CPU): two processes give one
process's deltas, losses and test metrics (float64 round-off), rank 0 alone writes; a
SIGTERM to one rank stops every rank at the same step boundary, and the run resumes in
one process; ``--nproc`` out of range is one line."""

import json
from pathlib import Path

import pytest
import torch

from helpers import run_python as _run
from sparsekern.cli import main

HERE = Path(__file__).resolve().parent


def test_two_processes_give_the_one_process_result(case, finetune_args, reference, result_difference):
    out = case / "two"
    done = _run("-m", "sparsekern", "finetune", *finetune_args(out), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    assert result_difference(out, reference) <= 1e-12
    # rank 0 wrote what one process writes, once (no temporaries left by a second writer)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_two_processes_select_the_one_process_epoch(case, finetune_args, result_difference):
    """With validation frames the two processes keep, and end on, the epoch one process
    does: here the first (frames labelled by the base model itself, as in
    tests/cli/test_cli_best_epoch.py)."""
    from helpers import labelled_by_the_model

    valid = labelled_by_the_model(case / "tiny.model", case / "test.xyz", case / "base_labelled.xyz")
    extra = ("--valid", str(valid), "--E0s", "foundation")
    one, two = case / "valid_one", case / "valid_two"
    assert main(["finetune", *finetune_args(one), *extra]) == 0
    assert json.loads((one / "metrics.json").read_text())["selected_epoch"] == 1
    done = _run("-m", "sparsekern", "finetune", *finetune_args(two), *extra, "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((two / "metrics.json").read_text())["selected_epoch"] == 1
    assert result_difference(two, one) <= 1e-12


def test_a_signal_to_one_rank_stops_all_at_one_step_and_resumes_in_one_process(
        case, finetune_args, reference, result_difference):
    out = case / "signalled"
    done = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE / "step_signals.py"),
                "1", "2", "finetune", *finetune_args(out))
    assert done.returncode != 0
    assert "rank 0: 2 steps, exit 143" in done.stderr and "rank 1: 2 steps, exit 143" in done.stderr, done.stderr[-4000:]
    assert done.stderr.count("stopped by SIGTERM at epoch 1, step 2; checkpoint written") == 1  # rank 0 speaks
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["step"]) == (0, 2)
    assert main(["finetune", *finetune_args(out)]) == 0  # one process resumes the two's checkpoint
    assert json.loads((out / "metrics.json").read_text())["processes"] == 1
    assert result_difference(out, reference) <= 1e-12


def test_nproc_below_one_is_refused_in_one_line(case, finetune_args, capsys):
    assert main(["finetune", *finetune_args(case / "none"), "--nproc", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsekern finetune: error: --nproc must be >= 1") and err.count("\n") == 1
    assert not (case / "none").exists()


def test_mace_train_distributed_on_cpu_is_refused_clearly(capsys):
    """MACE's --distributed starts NCCL (or Intel's CCL) only: on CPU it would end in a
    traceback inside MACE; sparsekern mace-train says so first."""
    pytest.importorskip("mace")
    with pytest.raises(SystemExit) as exit_:
        main(["mace-train", "--name", "x", "--train_file", "t.xyz", "--distributed", "--device", "cpu"])
    assert exit_.value.code == 2 and "MACE's data-parallel mode runs on GPUs only" in capsys.readouterr().err


def test_mace_train_under_torchrun_without_distributed_is_refused(capsys, monkeypatch):
    """torchrun's processes without --distributed would each train the whole run into the
    same files (one read a checkpoint another was writing): refused in one line."""
    pytest.importorskip("mace")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_:
        main(["mace-train", "--name", "x", "--train_file", "t.xyz", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "started as one of 2 processes (torchrun) without --distributed" in err


def test_evaluation_is_sharded_and_kept_in_order():
    """Each rank evaluates every size-th batch; every rank gets all results in batch order."""
    from sparsekern.finetune.distributed import Group
    from sparsekern.finetune.evaluation import map_batches

    class RankOneOfTwo(Group):
        def gather(self, items):  # rank 0's share, as all_gather_object would bring it
            assert sorted(items) == [1, 3]
            return {**items, 0: ["rank 0"], 2: ["rank 0"], 4: ["rank 0"]}

    done = []
    out = map_batches(lambda b: done.append(b) or b, list(range(9)), 2, RankOneOfTwo(rank=1, size=2))
    assert done == [[2, 3], [6, 7]]
    assert out == [["rank 0"], [2, 3], ["rank 0"], [6, 7], ["rank 0"]]


def test_an_input_error_found_in_the_workers_is_said_once_and_leaves_no_folder(case, finetune_args):
    """Training frames with an element the model lacks, found once the workers load the
    model: rank 0 says so, once, and the folder the launcher made is gone again (each
    rank said it, and the folder stayed, empty)."""
    from ase.io import read, write

    frames = read(case / "train.xyz", ":")
    frames[1].numbers[0] = 1
    write(case / "train_h.xyz", frames)
    out = case / "with_h"
    args = finetune_args(out)
    args[args.index("--train") + 1] = str(case / "train_h.xyz")
    done = _run("-m", "sparsekern", "finetune", *args, "--nproc", "2")
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2 and errors == [
        f"sparsekern finetune (rank 0): error: {case / 'train_h.xyz'} holds elements the model does not know: ['H']"]
    assert not out.exists()


def test_bad_input_under_torchrun_is_said_once(case, finetune_args):
    """torchrun's own launcher (no --nproc): every rank reads the data and finds the same
    NaN label; one says so (each did)."""
    from ase.io import read, write

    frames = read(case / "train.xyz", ":")
    frames[1].info["REF_energy"] = float("nan")
    write(case / "train_nan.xyz", frames)
    out = case / "nan_torchrun"
    args = finetune_args(out)
    args[args.index("--train") + 1] = str(case / "train_nan.xyz")
    done = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sparsekern",
                "finetune", *args)
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-4000:]
    assert errors[0].startswith("sparsekern finetune (rank 0): error: ") and "frame 1: energy" in errors[0], errors
    assert not out.exists()


def test_a_peer_s_failure_is_one_line(monkeypatch, capsys):
    """A collective that fails because another process stopped (its connection closed):
    one line, not torch.distributed's traceback; other RuntimeErrors keep theirs."""
    from sparsekern.cli.finetune import _guarded

    def collective():  # raised from a torch.distributed file, as gloo's closed connection is
        exec(compile("raise RuntimeError('Connection closed by peer')", "/x/torch/distributed/c10d.py", "exec"))

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _guarded(collective, "out") == 2
    assert capsys.readouterr().err == ("sparsekern finetune (rank 1): error: another process of the run stopped, so "
                                       "this one stops too (its message says why)\n")
    with pytest.raises(RuntimeError, match="a bug"):
        _guarded(lambda: exec("raise RuntimeError('a bug')"), "out")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection closed"):  # (one process: no peer to blame)
        _guarded(collective, "out")


@pytest.mark.parametrize("device, message", [
    ("cuda:1", "--device cuda:1 names one GPU, but each process takes the GPU of its local rank: give --device cuda"),
    ("cuda", "3 processes need 3 GPUs (one each), but this machine shows 2")])
def test_gpus_for_nproc_are_checked_before_the_workers_start(case, finetune_args, capsys, monkeypatch, device,
                                                               message):
    """One GPU per process, by local rank: a device naming one GPU, or more processes than
    GPUs, is refused by the launcher in one line (the workers found it, each saying so)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    out = case / "gpus"
    assert main(["finetune", *finetune_args(out), "--device", device, "--nproc", "3"]) == 2
    assert capsys.readouterr().err == f"sparsekern finetune: error: {message}\n"
    assert not out.exists()


def test_sums_of_host_tensors_go_through_the_gpu_under_nccl(monkeypatch):
    """NCCL reduces GPU tensors only: a host tensor (the magnetic fit's normal equations)
    is summed on the GPU and copied back in place (NCCL raised on it)."""
    import torch.distributed as dist

    from sparsekern.finetune.distributed import Group

    reduced = []
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self: self.clone())  # (no GPU here: a copy stands in)
    monkeypatch.setattr(dist, "all_reduce", lambda t: reduced.append(t) or t.mul_(2))
    host = torch.ones(3, dtype=torch.float64)
    assert Group(rank=0, size=2).sum(host) is host and host.tolist() == [2.0, 2.0, 2.0]
    assert len(reduced) == 1 and reduced[0] is not host
