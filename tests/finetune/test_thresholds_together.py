"""The element-wise (STR) deltas of a model computed together before each training
forward (``delta.prepare_values``, multi-tensor ops and one autograd node): the same
values and gradients as one delta at a time, each prepared value used once and only
while its parameters are unchanged, and the density controller's scores the same."""

import copy
import pickle

import pytest
import torch

pytest.importorskip("mace")

import sparsekern  # noqa: E402
from sparsekern.finetune import SparseConfig, calibrate_density, iter_deltas  # noqa: E402
from sparsekern.finetune import delta as delta_module  # noqa: E402
from sparsekern.finetune.delta import ThresholdDelta, prepare_values, scores_of, soft_threshold  # noqa: E402
from sparsekern.integrations.mace.models import mace_batch  # noqa: E402
from test_finetune import _structures, _train, base  # noqa: E402,F401 (the module's fixture)


def _deltas(model):
    return [d for *_, d in iter_deltas(model)]


def _prepared(base, dtype, mode="str", density=0.3):
    """A prepared model whose deltas have random values, a share of them above threshold,
    some entries exactly at it (|v| == tau: no change, no gradient either way)."""
    model = sparsekern.prepare(copy.deepcopy(base).to(dtype), SparseConfig(density=0.03, mode=mode))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for d in _deltas(model):
            d.v.copy_(torch.randn(d.v.shape, generator=g, dtype=torch.float64))
            d.log_tau.fill_(torch.randn((), generator=g, dtype=torch.float64).item() * 0.1)
    calibrate_density(model, density)
    with torch.no_grad():
        for d in _deltas(model):
            d.v[:3] = d.tau() * torch.tensor([1.0, -1.0, 1.0], dtype=dtype)
    return model


def _values_and_grads(deltas, together: bool):
    """Each delta's value, and the gradients of a random weighted sum of them."""
    for d in deltas:
        d.v.grad = d.log_tau.grad = None
    if together:
        prepare_values(deltas)
    values = [d() for d in deltas]
    g = torch.Generator().manual_seed(9)
    sum((torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) * v).sum() for v in values).backward()
    return ([v.detach() for v in values], [d.v.grad.clone() for d in deltas], [d.log_tau.grad.clone() for d in deltas])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_together_equals_one_at_a_time(base, dtype):
    deltas = _deltas(_prepared(base, dtype))
    assert len(deltas) > 3 and all(d.tile == (1, 1) for d in deltas)
    ones = _values_and_grads(deltas, together=False)
    both = _values_and_grads(deltas, together=True)
    assert all(d._pending is None for d in deltas)  # each taken
    for d, v in zip(deltas, ones[0]):  # the reference really is one delta at a time
        assert torch.equal(v, soft_threshold(d.v, d.tau()).detach())
    assert 0 < sum(int(v.count_nonzero()) for v in ones[0]) < sum(v.numel() for v in ones[0])
    for name, a_list, b_list in zip(("values", "v grads", "log_tau grads"), ones, both):
        for a, b in zip(a_list, b_list):
            if name == "log_tau grads":  # a sum over the entries, in another order
                assert torch.allclose(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0), name
            else:
                assert torch.equal(a, b), name
    assert all(v.grad[:3].eq(0).all() for v in (d.v for d in deltas))  # at the threshold: none


def test_training_steps_are_the_same(base, monkeypatch):
    """Three Adam steps of a MACE model: parameters bit for bit as with each delta on its own."""
    batch = mace_batch(base, _structures())
    calls = []
    monkeypatch.setattr("sparsekern.finetune.density.prepare_values", lambda ds: calls.append(1) or prepare_values(ds))
    together = _train(sparsekern.prepare(copy.deepcopy(base), SparseConfig(density=0.2, warmup_steps=1)), batch)
    assert len(calls) == 3
    monkeypatch.setattr(delta_module._SoftThresholds, "apply", None)  # would fail if still called
    monkeypatch.setattr("sparsekern.finetune.density.prepare_values", lambda deltas: None)
    alone = _train(sparsekern.prepare(copy.deepcopy(base), SparseConfig(density=0.2, warmup_steps=1)), batch)
    changed = 0
    for (name, a), (_, b) in zip(together.named_parameters(), alone.named_parameters()):
        if ".deltas." in name:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), name
            changed += int((a != 0).any())
    assert changed


def test_a_prepared_value_is_used_once_and_while_unchanged(base):
    deltas = _deltas(_prepared(base, torch.float64))
    d = deltas[0]
    prepare_values(deltas)
    first = d._pending[0]
    assert d() is first and d() is not first  # the second call computes afresh
    prepare_values(deltas)
    with torch.no_grad():
        d.v.mul_(2)  # an optimizer step
    assert torch.equal(d(), soft_threshold(d.v, d.tau()))  # not the stale value
    prepare_values(deltas)
    with torch.no_grad():
        assert d().grad_fn is None  # computed here, not the graph prepared with gradients
    prepare_values(deltas)
    twin = copy.deepcopy(d)  # a prepared value is never copied nor pickled (it holds a graph)
    assert twin._pending is None and pickle.loads(pickle.dumps(d))._pending is None
    assert d._pending is not None


@pytest.mark.parametrize("mode", ["str", "block"])
def test_scores_together_equal_one_at_a_time(base, mode):
    deltas = _deltas(_prepared(base, torch.float64, mode=mode))
    assert all(isinstance(d, ThresholdDelta) for d in deltas)
    alone = []
    for d in deltas:
        mag = d.v.abs() if d.tile == (1, 1) else d._tile_magnitudes()
        alone.append(torch.log(mag.clamp_min(torch.finfo(mag.dtype).tiny)) - d.log_tau)
    assert torch.equal(scores_of(deltas), torch.cat(alone).detach())


def test_a_value_no_layer_used_gets_no_gradient(base):
    """As one at a time: an optimizer must skip the parameters of a delta the forward did
    not use (None, not zeros, which Adam's moments would still move)."""
    deltas = _deltas(_prepared(base, torch.float64))
    prepare_values(deltas)
    sum(d().sum() for d in deltas[1:]).backward()
    assert deltas[0].v.grad is None and deltas[0].log_tau.grad is None
    assert all(d.v.grad is not None and d.log_tau.grad is not None for d in deltas[1:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_signed_sums_segmented_as_dot_products(dtype):
    """The GPU's segmented sum (tested here, on the CPU, which runs the dot products)."""
    from sparsekern.finetune.delta import _lengths, signed_sums

    g = torch.Generator().manual_seed(1)
    sizes = (5, 1, 300, 17)
    grads = [torch.randn(n, generator=g, dtype=dtype) for n in sizes]
    signs = [torch.randint(-1, 2, (n,), generator=g).to(dtype) for n in sizes]
    dots = signed_sums(grads, signs, _lengths(sizes, torch.device("cpu")), segmented=False)
    segmented = signed_sums(grads, signs, _lengths(sizes, torch.device("cpu")), segmented=True)
    assert torch.allclose(segmented, dots, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    assert torch.allclose(dots, torch.stack([(a * b).sum() for a, b in zip(grads, signs)]), rtol=1e-5, atol=0)


def test_gradcheck_together():
    """float64 gradcheck of the values computed together, in v and log_tau (entries kept
    clear of the threshold, where the soft threshold has no derivative)."""
    g = torch.Generator().manual_seed(3)
    sizes = (7, 1, 12)
    vs = [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]
    log_taus = [torch.tensor(-1.5, dtype=torch.float64) for _ in sizes]
    for v in vs:  # |v| - tau at least 0.05 from 0 (tau = exp(-1.5 + 0.1) = 0.25)
        v.copy_(torch.where((v.abs() - 0.25).abs() < 0.05, v + 0.2 * v.sign(), v))
    shifts = [torch.tensor(0.1, dtype=torch.float64) for _ in sizes]
    lengths = delta_module._lengths(sizes, torch.device("cpu"))

    def fn(*params):
        return delta_module._SoftThresholds.apply(lengths, shifts, *params)

    params = [t.clone().requires_grad_() for t in (*vs, *log_taus)]
    assert torch.autograd.gradcheck(fn, params, eps=1e-7)
