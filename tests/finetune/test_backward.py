"""A training step's backward into the trained tensors alone (``finetune.backward``): the
same gradients as a plain ``loss.backward()``, no gradient into the positions, fewer ops;
in MACE's own ``take_step`` too, through the wrapped loss (``mace-train``)."""

import copy

import pytest
import torch

pytest.importorskip("mace")

import sparsekern  # noqa: E402
from sparsekern.finetune.backward import backward, into_trained  # noqa: E402
from sparsekern.integrations.mace.models import mace_batch  # noqa: E402
from helpers import AtenOps  # noqa: E402
from test_finetune import _structures, base  # noqa: E402,F401 (the module's fixture)
from test_thresholds_together import _prepared  # noqa: E402


def _step(model, batch, into):
    """One force-training backward; (trained tensors' gradients, the positions' gradient, ops)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = None
    data = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    out = model(data, training=True, compute_force=True)
    loss = out["energy"].square().sum() + out["forces"].square().sum()
    with AtenOps() as ops:
        if into:
            backward(loss, trained + [torch.zeros(1)])  # a tensor that asks for no gradient is passed over
        else:
            loss.backward()
    return [p.grad.clone() for p in trained], data["positions"].grad, ops.n


def _model(base):
    """Deltas with random values, a share above threshold; the thresholds calibrated by a
    first training forward (as every training forward does), so the next ones agree."""
    model = _prepared(base, torch.float64)
    batch = mace_batch(model, _structures(2))
    model(dict(batch), training=True, compute_force=True)
    return model, batch


def test_backward_into_the_trained_skips_the_positions(base):
    model, batch = _model(base)
    want, positions, plain_ops = _step(model, batch, into=False)
    assert sum(bool(g.any()) for g in want) > len(want) / 2
    got, none, ops = _step(model, batch, into=True)
    assert positions is not None and none is None
    assert len(got) == len(want) > 0 and all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(got, want))
    assert ops < plain_ops, (ops, plain_ops)  # 2,689 against 2,983 here


def test_mace_take_step_goes_into_the_optimizers_tensors(base):
    """mace-train wraps MACE's ``take_step``: its loss's ``backward()`` names the
    optimizer's tensors; the step is the same, and MACE's function is restored after."""
    import importlib
    import types

    from sparsekern.integrations.mace.train_hooks import SparseHooks

    steps = importlib.import_module("mace.tools.train")
    take_step = steps.take_step
    model, batch = _model(base)

    class Batch(dict):
        def to(self, device):
            return self

        def to_dict(self):
            return self

    def one_step(step):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
        data = Batch({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        step(model=m, loss_fn=lambda pred, ref: pred["energy"].square().sum() + pred["forces"].square().sum(),
             batch=data, optimizer=opt, ema=None, output_args={"forces": True, "virials": False, "stress": False},
             max_grad_norm=None, device="cpu")
        return [p.grad for p in opt.param_groups[0]["params"]], data["positions"].grad

    want, positions = one_step(take_step)
    run_train = types.SimpleNamespace(configure_model=None, get_params_options=None, deepcopy=None, remove_pt_head=None,
                                      get_swa=None, tools=types.SimpleNamespace(train=None))
    with SparseHooks(sparsekern.SparseConfig(density=0.3), "torch", None).installed(run_train):
        assert steps.take_step is not take_step
        got, none = one_step(steps.take_step)
    assert steps.take_step is take_step  # restored
    assert positions is not None and none is None
    assert sum(bool(g.any()) for g in want) > len(want) / 2
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(got, want))


def test_into_trained_keeps_explicit_inputs():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    loss = into_trained(lambda x: (x * b).sum(), [b])(a)
    loss.backward(inputs=[a])  # an explicit choice wins
    assert torch.equal(a.grad, b.detach()) and b.grad is None
    loss = into_trained(lambda x: (x * b).sum(), [b])(a)
    loss.backward()
    assert torch.equal(b.grad, a.detach()) and torch.equal(a.grad, b.detach())  # a's unchanged
    frozen = torch.randn(3)
    backward((a * frozen).sum(), [frozen])  # nothing trains: a plain backward
    assert torch.equal(a.grad, b.detach() + frozen)
