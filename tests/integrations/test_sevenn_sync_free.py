"""``integrations/sevennet/sync_free.py``: SevenNet-0's type table and readout without host
reads give SevenNet's own energies, forces, stresses, atomic virials and force-loss
gradients bit for bit, batched (a crystal beside a molecule, whose zero volume is
clamped) and one structure at a time (as its calculator calls), and patching and
unpatching leave the state dict alone. That the patched model then reads nothing back
is tests/ops/test_gpu_proxy_sync.py's whole-model test, on meta tensors."""

import copy

import pytest
import torch

pytest.importorskip("sevenn")
import sevenn._keys as KEY  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.integrations.sevennet import sync_free  # noqa: E402
from sparsekern.integrations.sevennet.family import SevenNetFamily  # noqa: E402

FAMILY = SevenNetFamily()


@pytest.fixture(autouse=True)
def one_thread():
    """SevenNet's scatters sum in a different order run to run on several threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sevennet():
    return FAMILY.load("7net-0", "cpu")


def _structures():
    crystal = bulk("Si", "diamond", a=5.43) * (2, 1, 1)
    crystal.rattle(0.05, seed=0)
    water = molecule("H2O")
    water.numbers = [14, 14, 14]  # silicon: an element of the model; no cell, volume 0
    return [crystal, water]


def _outputs(model, batched: bool, training: bool):
    """Energies, forces, stresses, atomic virials and the force loss's parameter gradients."""
    model.set_is_batch_data(batched)
    model.train(training)
    graphs = [FAMILY.graph(model, atoms) for atoms in _structures()]
    inputs = [FAMILY.collate(graphs, "cpu")] if batched else graphs
    keys = (KEY.PRED_TOTAL_ENERGY, KEY.PRED_FORCE, KEY.PRED_STRESS, KEY.PRED_ATOMIC_VIRIAL)
    out = []
    for data in inputs:
        result = model(data)
        out += [result[k].detach() for k in keys]
        if training:
            loss = result[KEY.PRED_TOTAL_ENERGY].sum() + result[KEY.PRED_FORCE].square().sum()
            out += torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return out


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_sevennets_results_bit_for_bit(sevennet, batched, training):
    plain = copy.deepcopy(sevennet)
    plain.force_output.use_atomic_virial = True
    swapped = copy.deepcopy(plain)
    sync_free.swap(swapped)
    assert type(swapped.force_output) is sync_free.SyncFreeForceStressOutputFromEdge
    assert type(swapped.reduce_total_enegy) is sync_free.SyncFreeAtomReduce
    want, got = _outputs(plain, batched, training), _outputs(swapped, batched, training)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and torch.equal(g, w), i


def test_inside_another_model(sevennet):
    """Patching a model that holds SevenNet (as the magnetic model does) makes its type
    table a buffer too, so it moves with the model."""
    outer = torch.nn.ModuleDict({"base": copy.deepcopy(sevennet)})
    sparsekern.patch(outer, backend="torch")
    assert "base.z_to_onehot_tensor" in dict(outer.named_buffers())
    assert type(outer["base"].force_output) is sync_free.SyncFreeForceStressOutputFromEdge
    sparsekern.unpatch(outer)
    assert "base.z_to_onehot_tensor" not in dict(outer.named_buffers())
    assert torch.equal(outer["base"].z_to_onehot_tensor, sevennet.z_to_onehot_tensor)


def test_patch_and_unpatch_keep_the_state(sevennet):
    model = copy.deepcopy(sevennet)
    keys = list(model.state_dict())
    sparsekern.patch(model, backend="torch")
    assert type(model.force_output) is sync_free.SyncFreeForceStressOutputFromEdge
    assert "z_to_onehot_tensor" in dict(model.named_buffers())  # moves with the model
    assert list(model.state_dict()) == keys
    sparsekern.unpatch(model)
    assert type(model.force_output) is type(sevennet.force_output)
    assert type(model.reduce_total_enegy) is type(sevennet.reduce_total_enegy)
    assert "z_to_onehot_tensor" not in dict(model.named_buffers())
    assert torch.equal(model.z_to_onehot_tensor, sevennet.z_to_onehot_tensor)
    assert list(model.state_dict()) == keys


def test_one_uncollated_graph_in_batch_mode(sevennet):
    """One uncollated graph (its atom count 0-d) with a batch vector, the model in batch
    mode: SevenNet's readouts take it, and so do sparsekern's (they read the count's
    length and raised IndexError)."""
    graph = FAMILY.graph(sevennet, _structures()[0])
    graph[KEY.BATCH] = torch.zeros(graph[KEY.POS].shape[0], dtype=torch.long)
    assert graph[KEY.NUM_ATOMS].dim() == 0
    sevennet.set_is_batch_data(True)
    want = sevennet(copy.deepcopy(graph))[KEY.PRED_TOTAL_ENERGY].detach()
    got = sparsekern.patch(copy.deepcopy(sevennet))(copy.deepcopy(graph))[KEY.PRED_TOTAL_ENERGY].detach()
    assert got.shape == want.shape == (1,) and torch.allclose(got, want, rtol=1e-6)
