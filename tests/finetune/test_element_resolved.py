"""Element-resolved deltas on shared weights (``SparseConfig(element_resolved=True)``):
the irrep linear with W[z] = W0 + dW[z] against a per-node reference by hand, gradcheck
and O(3) equivariance (float64); on a tiny MACE model (or SevenNet-0): a fresh prepared
model is the base, the adapter round trip, every element's entries counted, merge
refused, and ``sparsekern finetune --element_resolved`` end to end."""

import copy
import json

import pytest
import torch
from e3nn import o3

import sparsekern
from sparsekern import delta_slot
from sparsekern.finetune import SparseConfig, iter_deltas, load_adapter, merge, save_adapter, stats
from sparsekern.finetune.delta import FixedDelta
from sparsekern.layers import IrrepsLinear
from helpers import TOL, random_o3, rel_err

IN, OUT, E = o3.Irreps("3x0e+2x1o+2x2e"), o3.Irreps("2x0e+3x1o+1x2e+1x1e"), 4


def _resolved_layer(seed: int = 0):
    """A float64 irrep linear with a dense random element-resolved delta on its weight."""
    torch.manual_seed(seed)
    layer = IrrepsLinear(IN, OUT).double()
    desc = layer.desc.per_element(E)
    values = torch.randn(desc.weight_numel, dtype=torch.float64)
    delta = FixedDelta(desc.weight_groups(), desc.weight_numel, torch.arange(desc.weight_numel), values,
                       elements=E)
    delta_slot.attach(layer, "weight", delta)
    species = torch.randint(0, E, (11,))
    delta_slot.give_species(layer, species)
    return layer, delta, species


def test_layer_equals_w0_plus_dw_of_each_node():
    layer, delta, species = _resolved_layer()
    x = torch.randn(len(species), IN.dim, dtype=torch.float64)
    y = layer(x)
    plain = IrrepsLinear(IN, OUT).double()
    dw = delta()
    for n, z in enumerate(species.tolist()):
        w = layer.weight.detach().clone()
        for shared, per in zip(layer.weight_groups(), delta.groups):  # W[z] = W0 + dW[z], path by path
            shared.view(w)[0] += per.view(dw)[z]
        with torch.no_grad():
            plain.weight.copy_(w)
        assert rel_err(y[n], plain(x[n:n + 1])[0]) <= TOL[torch.float64]


def test_gradcheck_through_the_delta():
    layer, delta, _ = _resolved_layer(1)
    species = torch.tensor([0, 3, 3, 1])
    delta_slot.give_species(layer, species)
    x = torch.randn(len(species), IN.dim, dtype=torch.float64, requires_grad=True)
    values = delta.values.detach().clone().requires_grad_(True)

    def f(x, values):
        return torch.func.functional_call(layer, {"deltas.weight.values": values}, (x,))

    assert torch.autograd.gradcheck(f, (x, values), fast_mode=True)  # (fast: CI time)
    assert torch.autograd.gradgradcheck(f, (x, values), fast_mode=True)


def test_equivariant_under_rotation_and_inversion():
    layer, _, species = _resolved_layer(2)
    rot = random_o3()
    x = torch.randn(len(species), IN.dim, dtype=torch.float64)
    rotated = layer(x @ IN.D_from_matrix(rot).T)
    assert rel_err(rotated, layer(x) @ OUT.D_from_matrix(rot).T) <= TOL[torch.float64]


def test_layer_refuses_missing_or_mismatched_species():
    layer, delta, _ = _resolved_layer()
    with pytest.raises(ValueError, match="one element per row"):
        layer(torch.randn(3, IN.dim, dtype=torch.float64))
    delta.species = None
    with pytest.raises(RuntimeError, match="no node species"):
        layer(torch.randn(3, IN.dim, dtype=torch.float64))


# ---- whole models: a tiny MACE (mace venv) ----

@pytest.fixture(scope="module")
def case(tmp_path_factory):
    pytest.importorskip("mace")
    from helpers import write_tiny_mace_case

    return write_tiny_mace_case(tmp_path_factory.mktemp("elem"), n_train=2)


def _outputs(model, case):
    from ase.io import read

    from sparsekern.integrations.mace.models import mace_batch

    out = model(mace_batch(model, read(case / "test.xyz", ":")), compute_force=True)
    return out["energy"].detach(), out["forces"].detach()


def _all_active(model, randomize: bool = True):
    """Every nonzero delta entry active (and, ``randomize``, trained-looking values)."""
    with torch.no_grad():
        for *_, d in iter_deltas(model):
            if randomize:
                d.v.normal_(0.0, 0.1)
            d.tau_shift.fill_(-30.0)


def test_mace_prepared_is_base_then_adapter_round_trips(case, tmp_path):
    base = sparsekern.patch(torch.load(case / "tiny.model", weights_only=False))
    model = sparsekern.prepare(copy.deepcopy(base), SparseConfig(element_resolved=True, density=0.05))
    resolved = [name for name, _, _, d in iter_deltas(model) if d.elements]
    assert resolved and all(d.elements == 2 for *_, d in iter_deltas(model) if d.elements)
    assert "node_embedding.linear" not in resolved  # a row per element already
    for a, b in zip(_outputs(model, case), _outputs(base, case)):
        assert torch.equal(a, b)
    _all_active(model)
    e, f = _outputs(model, case)
    assert not torch.equal(e, _outputs(base, case)[0])
    path = save_adapter(model, tmp_path / "elem.safetensors")
    fresh = load_adapter(torch.load(case / "tiny.model", weights_only=False), path)
    e2, f2 = _outputs(fresh, case)
    assert rel_err(e2, e) <= TOL[torch.float64] and rel_err(f2, f) <= TOL[torch.float64]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["version"] == "3" and json.loads(fh.metadata()["config"])["element_resolved"]
    with pytest.raises(ValueError, match=r"^merge: .*element-resolved delta") as err:
        merge(fresh)
    assert "\n" not in str(err.value) and not any(d.merged for *_, d in iter_deltas(fresh))


def test_mace_stats_count_the_training_data_s_elements(case):
    every = sparsekern.prepare(torch.load(case / "tiny.model", weights_only=False),
                               SparseConfig(element_resolved=True))
    shared = sum(layer.weight_numel for _, layer, _, d in iter_deltas(every) if d.elements)
    others = sum(d.numel for *_, d in iter_deltas(every) if not d.elements)
    assert stats(every)["total_params"] == 2 * shared + others  # both elements' copies of each shared weight
    model = sparsekern.prepare(torch.load(case / "tiny.model", weights_only=False),
                               SparseConfig(element_resolved=True, elements=[29]))
    _all_active(model, randomize=False)  # Al's entries start at exactly zero
    s = stats(model)
    resolved, own = (sum(d.pinned for *_, d in iter_deltas(model) if bool(d.elements) == r) for r in (True, False))
    assert resolved == shared and own > 0  # Al's copies, and its rows of the model's own per-element weights
    assert s["total_params"] == shared + others - own
    assert set(s["by_element"]) == {"Cu"} and s["by_element"]["Cu"]["changed"] > 0  # Al pinned, not counted
    assert s["by_element_l"]["Cu"]["1"]["changed"] > 0


def test_finetune_element_resolved_end_to_end(case, tmp_path, capsys):
    from sparsekern.cli import main

    out = tmp_path / "out"
    assert main(["finetune", "--model", str(case / "tiny.model"), "--train", str(case / "train.xyz"),
                 "--test", str(case / "test.xyz"), "--method", "sparse", "--element_resolved", "--density", "0.05",
                 "--epochs", "1", "--lr", "0.02", "--out", str(out), "--no_progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["merged_model"] is None and "element-resolved" in m["merged_model_skipped"]
    assert abs(m["changed_fraction"] - 0.05) <= 0.1 * 0.05
    assert main(["report", str(out / "adapter.safetensors")]) == 0
    report = json.loads((out / "adapter.report.json").read_text())
    assert set(report["l_profile"]) <= {"Al", "Cu"} and report["l_profile"]
    # which model and method it describes: the run's --model (resolved, a file), sparse and element-resolved
    assert report["base_model"] == str((case / "tiny.model").resolve())
    assert report["method"] == "sparse (str, element-resolved)"
    out_text, err = capsys.readouterr()
    assert "sparse (str, element-resolved) adapter out/adapter.safetensors of tiny.model: " in out_text
    assert "no merged model" in err


# ---- SevenNet-0 (sevenn venv): its 89 elements, float32 ----

def test_sevennet0_element_resolved(tmp_path):
    pytest.importorskip("sevenn")
    from ase.build import bulk

    from sparsekern.integrations import family_for

    family = family_for("7net-0")
    base = sparsekern.patch(family.load("7net-0", "cpu"))
    atoms = bulk("NiO", "rocksalt", a=4.17)
    atoms.rattle(0.05, seed=1)

    def predict(model):
        return [t.detach() for t in family.predict(model, family.collate([family.graph(model, atoms)], "cpu"), False)]

    def same(out, ref):  # (SevenNet's float32 forces differ at round-off between two calls of one model)
        return torch.equal(out[0], ref[0]) and rel_err(out[1], ref[1]) <= TOL[torch.float32]

    ref = predict(base)
    model = sparsekern.prepare(base, SparseConfig(element_resolved=True, elements=[8, 28], density=0.001))
    assert all(d.elements == 89 for *_, d in iter_deltas(model) if d.elements)
    assert same(predict(model), ref)
    with torch.no_grad():
        for *_, d in iter_deltas(model):
            d.tau_shift.fill_(-30.0)  # every nonzero entry (Ni's and O's) active
    changed = predict(model)
    s = stats(model)
    assert {e for e, v in s["by_element"].items() if v["changed"]} == set(s["by_element"]) == {"Ni", "O"}
    path = save_adapter(model, tmp_path / "a.safetensors")
    fresh = load_adapter(family.load("7net-0", "cpu"), path)
    assert same(predict(fresh), changed) and not same(changed, ref)


def test_auto_runs_the_delta_on_the_element_linear_s_own_row(monkeypatch):
    """auto's rows for the irrep linear and the element linear differ (on GPUs torch's
    GEMMs for the one, the CUDA or Triton kernel for the other): the delta's op follows
    its own row, not the back end the layer's op resolved to (torch's element linear
    reads its element counts back to the host)."""
    pytest.importorskip("triton")
    from sparsekern.ops import registry

    layer, _, species = _resolved_layer(2)
    x = torch.randn(len(species), IN.dim, dtype=torch.float64)
    want = layer(x)
    monkeypatch.setattr(registry, "_auto_table", lambda: {"cpu": {"linear": ["torch"],
                                                                   "element_linear": ["triton", "torch"]}})
    ran = []
    for name in ("torch", "triton"):
        fn = registry.implementation("element_linear", name)
        monkeypatch.setitem(registry._IMPLEMENTATIONS, ("element_linear", name),
                            lambda *a, fn=fn, name=name: ran.append(name) or fn(*a))
    layer.use_backend("auto", torch.device("cpu"))
    assert layer.backend == "torch"
    assert rel_err(layer(x), want) <= TOL[torch.float64] and ran == ["triton"]
