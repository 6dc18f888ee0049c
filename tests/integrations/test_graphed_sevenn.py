"""``integrations/sevennet/graphed.py``: SevenNet inference padded to a fixed capacity
and, on a GPU, replayed from CUDA graphs. On the CPU the padded call runs eagerly and
must give the model's own results (the padding atoms and edges reach nothing real), in
the calculator's mode and batched (a crystal beside a molecule), through SevenNet's
calculator; with the capture faked (each "replay" runs the captured call again into its
outputs) the replay path's copies are checked too: a new graph per shape, a larger one
when the edges outgrow it, the padding edges refilled after fewer edges."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")
import sevenn._keys as KEY  # noqa: E402
from sevenn.nn.sequential import AtomGraphSequential  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern import GraphedSevenNet  # noqa: E402
from sparsekern.integrations import cuda_graphs  # noqa: E402
from sparsekern.integrations.sevennet.family import SevenNetFamily  # noqa: E402
from helpers import fake_cuda_graphs, rel_err, sevennet_float64  # noqa: E402

FAMILY = SevenNetFamily()
RESULTS = (KEY.PRED_TOTAL_ENERGY, KEY.PRED_FORCE, KEY.PRED_STRESS, KEY.ATOMIC_ENERGY)


@pytest.fixture(scope="module")
def sevennet():
    return sparsekern.patch(sevennet_float64(FAMILY.load("7net-0", "cpu")), backend="torch")


@pytest.fixture(scope="module")
def multi_fidelity():
    """7net-mf-0, computing at PBE (its second modality: index 1)."""
    return sparsekern.patch(sevennet_float64(FAMILY.load("7net-mf-0", "cpu")), backend="torch")


def _structures(step: int = 0, a: float = 5.43):
    crystal = bulk("Si", "diamond", a=a) * (2, 1, 1)
    crystal.rattle(0.05 + 0.1 * step, seed=step)
    water = molecule("H2O")
    water.numbers = [14, 14, 14]  # elements of the model; no cell, volume 0
    return [crystal, water]


def _inputs(model, batched: bool, step: int = 0, a: float = 5.43):
    family = FAMILY.at_fidelity("PBE" if model.modal_map else None)
    graphs = [family.graph(model, atoms) for atoms in _structures(step, a)]
    for graph in graphs:
        for key, value in graph.items():
            if torch.is_tensor(value) and value.is_floating_point():
                graph[key] = value.double()
    return [FAMILY.collate(graphs, "cpu")] if batched else graphs


def _results(model, data):
    out = model(data)
    return [out[k].detach() for k in RESULTS]


def _check(got, want):
    for k, g, w in zip(RESULTS, got, want):
        assert g.shape == w.shape and rel_err(g, w) <= 1e-12, k


@pytest.mark.parametrize("model,batched,headroom", [("sevennet", False, 0.1), ("sevennet", True, 0.1),
                                                    ("sevennet", True, 3.0), ("multi_fidelity", False, 0.1),
                                                    ("multi_fidelity", True, 0.1)])
def test_padded_call_is_the_models(model, batched, headroom, request):
    plain = copy.deepcopy(request.getfixturevalue(model))
    plain.set_is_batch_data(batched)
    graphed = GraphedSevenNet(copy.deepcopy(plain), headroom)  # 3.0: more than one pair of padding atoms
    assert isinstance(graphed, AtomGraphSequential) and graphed.is_batch_data == batched
    for data in _inputs(plain, batched):
        want = _results(plain, copy.deepcopy(data))
        _check(_results(graphed, copy.deepcopy(data)), want)
        out = graphed(copy.deepcopy(data))
        assert (KEY.BATCH in out) == batched  # the padding's graph index is not handed back


@pytest.fixture
def fake_graphs(monkeypatch):
    fake_cuda_graphs(monkeypatch)


@pytest.mark.parametrize("batched", [False, True])
def test_replays_follow_the_atoms(sevennet, fake_graphs, batched):
    plain = copy.deepcopy(sevennet)
    plain.set_is_batch_data(batched)
    graphed = GraphedSevenNet(copy.deepcopy(plain), headroom=0.0)
    edges = []  # of the first call of each step
    for step in (0, 1, 2, 0):  # rattled more, then less: the edge counts differ
        for data in _inputs(plain, batched, step):
            _check(_results(graphed, copy.deepcopy(data)), _results(plain, copy.deepcopy(data)))
        edges.append(_inputs(plain, batched, step)[0][KEY.EDGE_IDX].shape[1])
    assert any(later < earlier for earlier, later in zip(edges, edges[1:]))  # padding refilled
    captured = list(graphed.replays.graphs.values())
    assert all(isinstance(c, cuda_graphs.Captured) for c in captured)
    assert len(captured) == (1 if batched else 2)  # one per shape (calculator: crystal, molecule)
    data = _inputs(plain, batched, a=4.6)[0]  # compressed: more edges than the capture holds
    assert data[KEY.EDGE_IDX].shape[1] > captured[0].edges
    _check(_results(graphed, copy.deepcopy(data)), _results(plain, copy.deepcopy(data)))
    assert graphed.replays.graphs[next(iter(graphed.replays.graphs))].edges >= data[KEY.EDGE_IDX].shape[1]


def test_molecular_dynamics_through_the_calculator(fake_graphs):
    """Verlet steps through SevenNet's calculator, replayed (faked), follow the plain
    model's trajectory: the atoms move, the edges come and go, one capture serves them."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    sevennet = sparsekern.patch(FAMILY.load("7net-0", "cpu"), backend="torch")
    paths = []
    for model in (copy.deepcopy(sevennet), GraphedSevenNet(copy.deepcopy(sevennet), headroom=0.1)):
        atoms = _structures(2)[0]  # rattled 0.25 A: large forces
        atoms.calc = FAMILY.model_calculator(model, "cpu")
        VelocityVerlet(atoms, 2 * units.fs).run(6)
        paths.append(atoms.get_positions())
    assert np.abs(paths[1] - paths[0]).max() <= 1e-5
    assert len(model.replays.graphs) == 1


def test_calculator_takes_it():
    """SevenNet's calculator (its own model class required; float32 inputs) gives the
    plain model's results."""
    sevennet = sparsekern.patch(FAMILY.load("7net-0", "cpu"), backend="torch")
    results = []
    for model in (copy.deepcopy(sevennet), GraphedSevenNet(copy.deepcopy(sevennet))):
        atoms = _structures()[0]
        atoms.calc = FAMILY.model_calculator(model, "cpu")
        results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    (e0, f0, s0), (e1, f1, s1) = results
    assert e1 == pytest.approx(e0, rel=1e-6)
    assert np.abs(f1 - f0).max() <= 1e-5 * np.abs(f0).max()
    assert np.abs(s1 - s0).max() <= 1e-5 * np.abs(s0).max()


def test_adapters_are_loaded_before_the_capture(sevennet):
    """GraphedSevenNet is the model itself (its class swapped), with no .model to give:
    load_adapter and save_adapter say to use them before wrapping it."""
    graphed = GraphedSevenNet(copy.deepcopy(sevennet))
    for call in (lambda: sparsekern.save_adapter(graphed, "never.safetensors"),
                 lambda: sparsekern.load_adapter(graphed, "never.safetensors")):
        with pytest.raises(ValueError, match="GraphedSevenNet replays the model's CUDA graphs: load and save "
                                             "adapters before it captures them"):
            call()


def test_training_runs_the_model_itself(sevennet):
    model = GraphedSevenNet(copy.deepcopy(sevennet)).train()
    model.set_is_batch_data(True)
    data = _inputs(model, True)[0]
    out = model(data)
    out[KEY.PRED_TOTAL_ENERGY].sum().backward()
    assert next(p for p in model.parameters() if p.requires_grad).grad is not None
    assert not model.replays.graphs


def test_bad_input_is_one_line(sevennet, multi_fidelity):
    with pytest.raises(TypeError, match="GraphedSevenNet takes a SevenNet AtomGraphSequential, got Linear"):
        GraphedSevenNet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="headroom must be >= 0, got -1"):
        GraphedSevenNet(copy.deepcopy(sevennet), headroom=-1)
    model = GraphedSevenNet(copy.deepcopy(sevennet))
    model.set_is_batch_data(True)
    data = _inputs(model, True)[0]
    del data[KEY.CELL_VOLUME]
    with pytest.raises(ValueError, match=r"GraphedSevenNet: the input lacks \['cell_volume'\]"):
        model(data)
    deployed = copy.deepcopy(multi_fidelity)
    deployed.prepare_modal_deploy("PBE")
    with pytest.raises(ValueError, match=r"GraphedSevenNet: the model was deployed at one modality \(sevenn's"):
        GraphedSevenNet(deployed)
    model = GraphedSevenNet(copy.deepcopy(multi_fidelity))
    model.set_is_batch_data(True)
    data = _inputs(model, True)[0]
    data[KEY.DATA_MODALITY] = ["PBE", "HSE"]
    with pytest.raises(ValueError, match=r"GraphedSevenNet: modality 'HSE' is not one of the model's \(PBE, R2SCAN\)"):
        model(copy.deepcopy(data))
    del data[KEY.DATA_MODALITY]
    with pytest.raises(ValueError, match=r"GraphedSevenNet: the input lacks \['data_modality'\]"):
        model(data)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_replays_follow_the_atoms():
    """Real replays (Triton back end, float32), the calculator's mode: each replay gives
    the eager model's energy, forces and stress as the edges come and go."""
    model = sparsekern.patch(FAMILY.load("7net-0", "cuda"), backend="triton")
    model.set_is_batch_data(False)
    graphed = GraphedSevenNet(copy.deepcopy(model), headroom=0.0)
    for step, order in ((1, 1), (2, -1), (3, 1), (0, -1)):
        atoms = _structures(step)[0][::order]
        data = FAMILY.graph(model, atoms).to("cuda")
        want, got = _results(model, copy.deepcopy(data)), _results(graphed, copy.deepcopy(data))
        for k, g, w in zip(RESULTS, got, want):
            assert rel_err(g, w) <= 1e-5, (step, k)
    assert all(isinstance(c, cuda_graphs.Captured) for c in graphed.replays.graphs.values())
