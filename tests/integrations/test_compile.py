"""torch.compile of a patched model on CPU (torch back end): SevenNet-0's energy and
forces, forward and backward compiled by AOTAutograd, equal eager's in float64; a model
prepared for sparse fine-tuning traces as one graph alike."""

import copy

import pytest
import torch

pytest.importorskip("sevenn")
from ase.build import bulk  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.integrations.sevennet.models import load_sevennet  # noqa: E402
from helpers import TOL, rel_err  # noqa: E402


@pytest.fixture(scope="module")
def sevennet0_short() -> torch.nn.Module:
    """SevenNet-0 in float64 with its first and last interaction blocks (blocks 1-3 map
    the hidden irreps to themselves): its weights and every kind of layer, compiled in
    about 20 s on 2 cores where the five blocks take about 55 s."""
    model = load_sevennet("7net-0")
    for name in [n for n in model._modules if n[0] in "123"]:
        del model._modules[name]

    def to_float64(module, args, data):  # sevenn's one-hot embedding casts to float32
        for key in (module.key_output, module.key_additional_output):
            if key is not None:
                data[key] = data[key].double()
        return data

    model.onehot_idx_to_onehot.register_forward_hook(to_float64)
    return model.double().eval()


def _compiled_matches_eager(model, backend: str = "aot_eager") -> None:
    """Energy and forces of a rattled 2-atom silicon cell, compiled and eager. SevenNet's
    force module calls torch.autograd.grad inside the model's module loop, a graph break
    in a loop that makes Dynamo compile each module apart (about 100 frames): here the
    modules up to the energy are one graph (fullgraph: no break in our layers) and the
    force module runs eagerly, through the compiled backward."""
    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=1)
    energy_modules = [m for name, m in model._modules.items() if name != "force_output"]

    def energy(data):
        for module in energy_modules:
            data = module(data)
        return data

    def physics(run):
        data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, float(model.cutoff)))
        data[KEY.BATCH] = torch.zeros(len(atoms), dtype=torch.long)
        for k, v in data.items():
            if torch.is_tensor(v) and v.is_floating_point():
                data[k] = v.double()
        out = model.force_output(run(model._preprocess(data)))
        return out[KEY.PRED_TOTAL_ENERGY].detach(), out[KEY.PRED_FORCE].detach()

    e0, f0 = physics(energy)
    e1, f1 = physics(torch.compile(energy, backend=backend, fullgraph=True))
    assert rel_err(e1, e0) <= TOL[torch.float64]
    assert rel_err(f1, f0) <= TOL[torch.float64]


def test_sevennet0_compiles(sevennet0_short):
    model = sparsekern.patch(copy.deepcopy(sevennet0_short), backend="torch")
    _compiled_matches_eager(model)


def test_prepared_sevennet0_compiles(sevennet0_short):
    """Inference of a model prepared for sparse fine-tuning, its deltas at the target
    density (a prepared model starts at density 0). Dynamo alone (one graph, so no break
    and no guard failure in the deltas): AOTAutograd passes too, in 40 s where the test
    above takes 20 s (it retraces: Dynamo first traces each delta's 0-d tau_shift buffer
    as a symbolic float)."""
    model = sparsekern.prepare(copy.deepcopy(sevennet0_short), sparsekern.SparseConfig(density=0.05), backend="torch")
    sparsekern.finetune.calibrate_density(model)
    assert any(d().count_nonzero() for *_, d in sparsekern.finetune.iter_deltas(model))
    _compiled_matches_eager(model, backend="eager")
