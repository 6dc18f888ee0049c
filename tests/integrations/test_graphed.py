"""``integrations/mace/graphed.py``: MACE inference padded to a fixed capacity and, on a
GPU, replayed from CUDA graphs. On the CPU the padded call runs eagerly: its results must
be the model's own, exactly (the padding atoms and edges reach nothing real), for
crystals and molecules in one batch, with stresses, and through MACE's calculator."""

import copy

import pytest
import torch

pytest.importorskip("mace")
from ase.build import bulk, molecule  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern import GraphedMACE  # noqa: E402
from sparsekern.integrations import cuda_graphs  # noqa: E402
from sparsekern.integrations.mace.graphed import pad  # noqa: E402
from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped  # noqa: E402
from helpers import fake_cuda_graphs, rel_err  # noqa: E402


def _model(dtype=torch.float64):
    model = mace_mp0_shaped("small", num_elements=3, atomic_numbers=[1, 8, 29], dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)  # as MACE's calculator leaves them
    return model


def _structures():
    crystal = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    crystal.rattle(0.05, seed=1)
    return [crystal, molecule("H2O")]


@pytest.mark.parametrize("stress,headroom", [(False, 0.1), (True, 0.1), (True, 3.0)])
def test_padded_call_is_the_models(stress, headroom):
    model = _model()
    batch = mace_batch(model, _structures())
    n, e = batch["positions"].shape[0], batch["edge_index"].shape[1]
    padding = cuda_graphs.padding_atoms(n, e, cuda_graphs.capacity(e, headroom))
    assert (padding == 2) == (headroom < 1)  # one pair of padding atoms, or more
    want = model(dict(batch), compute_force=True, compute_stress=stress)
    got = GraphedMACE(model, headroom)(dict(batch), compute_force=True, compute_stress=stress)
    keys = ["energy", "node_energy", "forces"] + (["stress"] if stress else [])
    for k in keys:
        assert got[k].shape == want[k].shape and rel_err(got[k], want[k]) <= 1e-12, k


def test_outputs_placed_by_length_when_atoms_would_number_the_edges():
    """MACE's per-edge ``edge_forces`` is placed by its length: 48 atoms with 4 edges (a
    capacity of 64) would have 62 + 2 = 64 padded atoms, one more keeps them apart."""
    from ase import Atoms

    model = _model()
    pos = [[0, 0, 0], [0.74, 0, 0], [0, 20, 0], [0.74, 20, 0]] + [[20.0 * (i + 1), 40.0, 0] for i in range(44)]
    batch = mace_batch(model, [Atoms("H48", positions=pos)])
    n, e = batch["positions"].shape[0], batch["edge_index"].shape[1]
    assert (n, e, cuda_graphs.capacity(e, 0.1)) == (48, 4, 64) and cuda_graphs.padding_atoms(n, e, 64) == 17
    want = model(dict(batch), compute_force=True, compute_edge_forces=True)
    got = GraphedMACE(model)(dict(batch), compute_force=True, compute_edge_forces=True)
    for k in ("forces", "edge_forces"):
        assert got[k].shape == want[k].shape and rel_err(got[k], want[k]) <= 1e-12, k


def test_calculator_with_a_patched_model():
    """MACE's calculator takes the wrapper (attributes read through); a patched model
    (Triton back end, interpreted here) gives the plain calculator's results."""
    from mace.calculators import MACECalculator

    patched = sparsekern.patch(_model(), backend="triton")
    results = []
    for model in (copy.deepcopy(patched), GraphedMACE(copy.deepcopy(patched))):
        atoms = _structures()[0]
        atoms.calc = MACECalculator(models=model, device="cpu", default_dtype="float64")
        results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    (e0, f0, s0), (e1, f1, s1) = results
    assert e1 == pytest.approx(e0, rel=1e-12)
    assert rel_err(torch.tensor(f1), torch.tensor(f0)) <= 1e-12
    assert rel_err(torch.tensor(s1), torch.tensor(s0)) <= 1e-12


def test_training_runs_the_model_itself():
    """Training, or weights that need a gradient, are the model's own call (no padding)."""
    model = mace_mp0_shaped("small", num_elements=3, atomic_numbers=[1, 8, 29], dtype=torch.float64)
    batch = mace_batch(model, _structures())
    out = GraphedMACE(model)(dict(batch), training=True, compute_force=True)
    assert out["forces"].shape[0] == batch["positions"].shape[0]
    out["energy"].sum().backward()
    assert next(model.parameters()).grad is not None


def test_replays_follow_the_atoms_on_the_cpu(monkeypatch):
    """With the capture faked (each "replay" runs the captured call again into its
    outputs): a rattled crystal, its atoms listed forwards or backwards (edge counts
    628, 606, 610, 624), gives the model's results; a call with fewer edges than the one
    captured has the rows after its edges refilled with padding edges, not the captured
    call's real ones (which, read with other atoms' positions, fall inside the cutoff);
    a call with more edges than it holds captures a larger one."""
    fake_cuda_graphs(monkeypatch)
    model = _model()
    graphed = GraphedMACE(model, headroom=0.0)
    crystal = bulk("Cu", "fcc", a=3.6) * (2, 2, 2)
    edges = []
    for step, order in ((1, 1), (2, -1), (3, 1), (0, -1)):
        atoms = crystal.copy()
        atoms.rattle(0.1 * step, seed=step)
        atoms = atoms[::order]
        batch = mace_batch(model, [atoms])
        edges.append(batch["edge_index"].shape[1])
        want = model(dict(batch), compute_force=True, compute_stress=True)
        got = graphed(dict(batch), compute_force=True, compute_stress=True)
        for k in ("energy", "forces", "stress"):
            assert rel_err(got[k], want[k]) <= 1e-12, (step, k)
    assert any(later < earlier for earlier, later in zip(edges, edges[1:])), edges
    assert all(isinstance(c, cuda_graphs.Captured) for c in graphed.replays.graphs.values())
    (held,) = graphed.replays.graphs.values()
    atoms = bulk("Cu", "fcc", a=3.2) * (2, 2, 2)  # compressed: more edges than the capture holds
    batch = mace_batch(model, [atoms])
    assert batch["edge_index"].shape[1] > held.edges
    want = model(dict(batch), compute_force=True, compute_stress=True)
    got = graphed(dict(batch), compute_force=True, compute_stress=True)
    assert all(rel_err(got[k], want[k]) <= 1e-12 for k in ("energy", "forces", "stress"))
    (grown,) = graphed.replays.graphs.values()
    assert grown.edges >= batch["edge_index"].shape[1]


def test_replays_follow_the_adapter(monkeypatch, tmp_path):
    """A model with adapters in MD (frozen: the deltas' values cached, read by the
    capture): after the active deltas change in place, or another adapter is set, the
    capture is made anew and gives the model's results; the fake graphs fail a replay
    that would read the old values (what a real graph would silently do)."""
    import itertools

    from sparsekern.finetune import calibrate_density, iter_deltas, load_adapter, set_adapter

    fake_cuda_graphs(monkeypatch)
    base = sparsekern.patch(_model())
    paths = []
    for seed in (1, 2):
        trained = sparsekern.prepare(copy.deepcopy(base), sparsekern.SparseConfig(density=0.2, seed=seed))
        calibrate_density(trained)
        paths.append(sparsekern.save_adapter(trained, tmp_path / f"{seed}.safetensors"))
    model = load_adapter(base, paths[0], name="one")
    load_adapter(model, paths[1], name="two")
    set_adapter(model, "one")
    model.requires_grad_(False)
    graphed = GraphedMACE(model)
    batch = mace_batch(model, _structures()[:1])

    def check():
        want = model(dict(batch), compute_force=True)
        got = graphed(dict(batch), compute_force=True)
        assert all(rel_err(got[k], want[k]) <= 1e-12 for k in ("energy", "forces"))
        return want["energy"]

    before = check()
    check()  # replayed
    (first,) = graphed.replays.graphs.values()
    with torch.no_grad():
        for *_, delta in iter_deltas(model):
            for t in itertools.chain(delta.parameters(), delta.buffers()):
                if t.is_floating_point():
                    t.mul_(1.5)
    assert rel_err(check(), before) > 1e-6
    set_adapter(model, "two")
    check()
    (last,) = graphed.replays.graphs.values()
    assert last is not first


def test_bad_input_is_one_line():
    model = _model()
    batch = mace_batch(model, _structures())
    with pytest.raises(ValueError, match="headroom must be >= 0, got -0.5"):
        GraphedMACE(model, headroom=-0.5)
    with pytest.raises(ValueError, match=r"the batch lacks \['cell'\]"):
        GraphedMACE(model)({k: v for k, v in batch.items() if k != "cell"})
    with pytest.raises(ValueError, match=r"630 edges and 11 atoms \(and 2 padding atoms\) do not fit a capacity of 600 edges"):
        pad(batch, 600, 5.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_replays_follow_the_atoms():
    """Steps of a rattled crystal, its atoms listed forwards or backwards (their edge
    counts differ: the padding refilled after fewer edges), one graph per set of flags
    while the edges fit its capacity: each replay gives the eager model's energy, forces
    and (MACE's calculator asks for them) stresses."""
    model = sparsekern.patch(_model(torch.float32), backend="triton").cuda()
    graphed = GraphedMACE(model, headroom=0.2)
    crystal = bulk("Cu", "fcc", a=3.6) * (3, 3, 3)
    counts = set()
    for step, order in ((1, 1), (2, -1), (3, 1), (0, -1)):
        atoms = crystal.copy()
        atoms.rattle(0.1 * step, seed=step)
        atoms = atoms[::order]
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in mace_batch(model, [atoms]).items()}
        counts.add(batch["edge_index"].shape[1])
        for stress in (False, True):
            want = model(dict(batch), compute_force=True, compute_stress=stress)
            got = graphed(dict(batch), compute_force=True, compute_stress=stress)
            for k in ("energy", "forces") + (("stress",) if stress else ()):
                assert rel_err(got[k], want[k]) <= 1e-5, (step, k)
    assert len(counts) > 1 and len(graphed.replays.graphs) == 2
    # captured, not the eager fallback
    assert all(isinstance(c, cuda_graphs.Captured) for c in graphed.replays.graphs.values())
