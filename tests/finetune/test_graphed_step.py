"""Training steps replayed from CUDA graphs (``--cuda_graphs``, ``finetune.graphed_step``):
on the CPU the captures are fakes that rerun the step (``helpers.fake_cuda_graphs``), so
the padding, the loss's weights, the copies into a capture, the kept graphs and the
density schedule's step count are checked here; a run's results are the eager run's."""

import json

import pytest
import torch

pytest.importorskip("mace")

from sparsekern.cli import main  # noqa: E402
from sparsekern.finetune import graphed_step  # noqa: E402
from helpers import fake_cuda_graphs  # noqa: E402


@pytest.fixture
def graphs(monkeypatch):
    """Fake CUDA graphs, strict (the tiny case's batches plan alike on the CPU: every atom
    has 12 neighbours); the steps the trainer's GraphedSteps captured and replayed."""
    fake_cuda_graphs(monkeypatch, strict=True)
    return _recorded(monkeypatch)


def _recorded(monkeypatch):
    """(the GraphedSteps the trainer makes, the shapes of each replay's inputs)."""
    from sparsekern.finetune import graphed_step

    made = []
    real = graphed_step.GraphedSteps.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(graphed_step.GraphedSteps, "__init__", init)
    replays = []
    monkeypatch.setattr(graphed_step._CapturedStep, "__call__", _counted(graphed_step._CapturedStep.__call__, replays))
    return made, replays


def _counted(call, calls):
    """``call`` recording each replay: "step" (its inputs hold the loss's labels) or "predict"."""
    def counted(self, inputs):
        calls.append("step" if "graph_labels" in inputs else "predict")
        return call(self, inputs)
    return counted


def test_graphed_run_is_the_eager_run(graphs, tmp_path, finetune_args, reference, result_difference):
    made, replays = graphs
    out = tmp_path / "graphed"
    assert main(["finetune", *finetune_args(out), "--cuda_graphs", "--device", "cpu"]) == 0
    assert result_difference(out, reference) <= 1e-12
    # 2 epochs of batches of 2, 2 and 1 frames: the first step eager (the density rises
    # from 0), the other 5 replayed, from one graph per number of frames; the zero-shot
    # and the final test evaluations (one frame) replayed too, captured anew for the
    # trained weights
    (steps,) = made
    assert replays == ["predict"] + ["step"] * 5 + ["predict"]
    assert sorted(key[:2] for key in steps.replays.graphs) == [("predict", 1), ("step", 1), ("step", 2)]
    # the density schedule counted every step, replayed or not (a replay runs no hook)
    counts = [{k: v for k, v in torch.load(d / "checkpoint.pt", weights_only=False)["model"].items()
               if k.endswith("_extra_state")} for d in (out, reference)]
    assert counts[0] == counts[1] and {v["steps"] for v in counts[0].values()} == {6}


def test_cuda_graphs_need_a_cuda_device(finetune_args, tmp_path, capsys):
    assert main(["finetune", *finetune_args(tmp_path / "run"), "--cuda_graphs"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--cuda_graphs replays CUDA graphs: it needs --device cuda, got cpu"), err


def test_steps_replay_once_the_density_holds_still(graphs, tmp_path, finetune_args, result_difference):
    """With a density warmup (the first epoch's 3 steps), those steps run eagerly: a
    replay would calibrate to the density of the step it was captured at."""
    made, replays = graphs
    warmup = ("--density_warmup", "1", "--density_peak", "0.06", "--device", "cpu")
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert main(["finetune", *finetune_args(eager), *warmup]) == 0
    assert main(["finetune", *finetune_args(graphed), *warmup, "--cuda_graphs"]) == 0
    assert result_difference(graphed, eager) <= 1e-12
    assert replays.count("step") == 3


def test_fake_replays_must_issue_the_captured_ops(monkeypatch):
    """The CPU's fake graphs fail where a real replay would silently differ: a call
    whose ops follow host state changed since the capture."""
    from sparsekern.integrations import cuda_graphs

    fake_cuda_graphs(monkeypatch, strict=True)
    rows = [2]
    graph, out = cuda_graphs.capture(lambda: {"x": torch.arange(4.0)[:rows[0]].sum().reshape(1)})
    graph.replay()
    rows[0] = 3
    with pytest.raises(AssertionError, match="the replay's ops differ from the capture's at op 1"):
        graph.replay()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graphed_run_is_the_eager_run(monkeypatch, tmp_path, finetune_args, result_difference):
    made, replays = _recorded(monkeypatch)
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert main(["finetune", *finetune_args(eager), "--device", "cuda"]) == 0
    assert main(["finetune", *finetune_args(graphed), "--device", "cuda", "--cuda_graphs"]) == 0
    assert replays.count("step") == 5 and replays.count("predict") == 2
    assert all(isinstance(c, graphed_step._CapturedStep) for c in made[0].replays.graphs.values())
    assert result_difference(graphed, eager) <= 1e-9  # float64; summation orders differ on a GPU
    merged = torch.load(eager / "merged.model", weights_only=False)  # saved on the CPU, as MACE's --save_cpu
    assert {p.device.type for p in merged.parameters()} == {"cpu"}


def test_graphed_stress_training_is_the_eager_one(graphs, tmp_path, finetune_args, case, result_difference):
    """--stress_weight under --cuda_graphs: the steps and evaluations (stresses included)
    replay what the eager run computes."""
    from helpers import with_stresses

    made, replays = graphs
    train, test = with_stresses(case, tmp_path, unlabelled=(1,))
    args = ("--train", str(train), "--test", str(test), "--stress_weight", "1000", "--device", "cpu")
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert main(["finetune", *finetune_args(eager), *args]) == 0
    assert main(["finetune", *finetune_args(graphed), *args, "--cuda_graphs"]) == 0
    assert result_difference(graphed, eager) <= 1e-12 and replays.count("step") == 5
    m = [json.loads((d / "metrics.json").read_text()) for d in (graphed, eager)]
    for key in ("test_stress_mae_mev_per_A3", "zero_shot_test_stress_mae_mev_per_A3"):
        assert m[0][key] == pytest.approx(m[1][key], rel=1e-12) and m[0][key] > 0


def test_evaluations_follow_the_trained_weights(graphs, tmp_path, finetune_args, case, result_difference):
    """Validation every epoch: each epoch's first batch captures anew (the weights, and
    the frozen deltas' values cached from them, changed since), the others replay."""
    made, replays = graphs
    valid = ("--valid", str(case / "train.xyz"), "--device", "cpu")
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert main(["finetune", *finetune_args(eager), *valid]) == 0
    assert main(["finetune", *finetune_args(graphed), *valid, "--cuda_graphs"]) == 0
    assert result_difference(graphed, eager) <= 1e-12
    history = [json.loads((d / "metrics.json").read_text())["history"] for d in (graphed, eager)]
    got, want = ([v for h in run for v in h["valid"].values()] for run in history)
    assert len(got) == 8 and got == pytest.approx(want, rel=1e-12)
    # zero-shot test and validation (the base's loss), 3 validation batches an epoch, the test
    assert replays.count("predict") == 1 + 3 + 2 * 3 + 1
