"""SevenNet-0 and SevenNet-l3i5, the real foundation models, patched in place (the
convolution fused): energies, forces, stresses and force-loss gradients unchanged, also
in a fine-tuning step and in SevenNet's parallel mode, and unpatch restores e3nn."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")
from ase.io import read  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.layers import ChannelwiseConv, IrrepsLinear, RadialMLP, SparsekernLayer  # noqa: E402
from sparsekern.locations import data_dir  # noqa: E402
from sparsekern.integrations.sevennet.models import load_sevennet  # noqa: E402
from helpers import TOL, patch_failing_at, rel_err, sevennet_float64  # noqa: E402


@pytest.fixture(scope="module")
def sevennet():
    return load_sevennet("7net-0")


@pytest.fixture(scope="module")
def sevennet64():
    return sevennet_float64(load_sevennet("7net-0"))


def _structures():
    si = data_dir() / "si_mlearn" / "Si_test.xyz"
    aspirin = data_dir() / "rmd17" / "revised_aspirin" / "test.xyz"
    if not si.exists() or not aspirin.exists():
        pytest.skip(f"real data missing: {si}, {aspirin}")
    # held-out frames with sizeable forces (relative errors of near-zero forces mean nothing)
    frames = read(si, index=":")
    strongest = max(frames, key=lambda a: np.abs(a.arrays["REF_forces"]).max())
    return [strongest, read(aspirin, index=999)]


def _physics(model, atoms):
    from sevenn.calculator import SevenNetCalculator

    calc = SevenNetCalculator(model=model, device="cpu")
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def test_sevennet0_energies_forces(sevennet):
    model = copy.deepcopy(sevennet)
    structures = _structures()
    ref = [_physics(model, a) for a in structures]
    assert sparsekern.patch(model) is model
    kinds = {type(m) for _, m in sparsekern.patched_layers(model)}
    assert {IrrepsLinear, ChannelwiseConv, RadialMLP} <= kinds
    for (e0, f0), atoms in zip(ref, structures):
        e1, f1 = _physics(model, atoms)
        assert abs(e1 - e0) / abs(e0) <= 2e-5
        assert np.abs(f1 - f0).max() / np.abs(f0).max() <= 2e-5
    sparsekern.unpatch(model)
    assert not any(isinstance(m, SparsekernLayer) for m in model.modules())
    blocks = [type(m) for n, m in model.named_modules() if n.endswith("_convolution")]
    assert blocks == [type(m) for n, m in sevennet.named_modules() if n.endswith("_convolution")]


def test_sevennet0_force_loss_gradients(sevennet64):
    """The force and stress loss's parameter gradients (a double backward through the
    fused conv)."""
    model = copy.deepcopy(sevennet64)
    model.train()  # gradients of the force loss need the graph of the forces
    for p in model.parameters():
        p.requires_grad_(True)
    atoms = _structures()[0]

    def grads():
        energy, forces, stress = _predict(model, atoms)
        assert stress.abs().max() > 0
        loss = (forces ** 2).sum() + energy.sum() + 1e4 * (stress ** 2).sum()
        params = [p for p in model.parameters() if p.requires_grad]
        return forces.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    f0, g0 = grads()
    sparsekern.patch(model)
    f1, g1 = grads()
    assert rel_err(f1, f0) <= TOL[torch.float64]
    for a, b in zip(g1, g0):
        assert (a is None) == (b is None)
        if a is not None and b.abs().max() > 0:
            assert rel_err(a, b) <= 1e-10  # sums over many edges, reordered

def _silicon64():
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=1)
    return atoms


def _predict(model, atoms):
    """Energy, forces and stress through SevenNet's own forward, in the model's dtype
    (its calculator would cast the model to float32)."""
    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    dtype = next(model.parameters()).dtype
    data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, float(model.cutoff)))
    data[KEY.BATCH] = torch.zeros(len(atoms), dtype=torch.long)
    for k, v in data.items():
        if torch.is_tensor(v) and v.is_floating_point():
            data[k] = v.to(dtype)
    out = model(data)
    return [out[k] for k in (KEY.PRED_TOTAL_ENERGY, KEY.PRED_FORCE, KEY.PRED_STRESS)]


def _assert_same(got, expected, tol):
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= tol


@pytest.mark.parametrize("name,dtype", [("7net-0", torch.float64), ("7net-0", torch.float32),
                                        ("7net-l3i5", torch.float64)])
def test_fused_convolution_whole_model(sevennet, sevennet64, name, dtype):
    """Every interaction block's convolution runs the fused conv, and the whole model
    computes what SevenNet's (gather, e3nn product, scatter) does: 64-atom silicon, and an
    isolated atom (no edges at all)."""
    from ase import Atoms

    if name == "7net-0":
        base = sevennet64 if dtype == torch.float64 else sevennet
    else:
        base = sevennet_float64(load_sevennet(name))
    model = sparsekern.patch(copy.deepcopy(base), backend="torch")
    convs = [m for n, m in model.named_modules() if n.endswith("_convolution")]
    assert convs and all(isinstance(m.convolution, ChannelwiseConv) for m in convs)
    left = {n: why for n, _, why in sparsekern.patching.last_report.left if n.endswith("_convolution")}
    assert len(left) == len(convs) and set(left.values()) == {"its own parameters kept, its product fused"}
    for atoms in (_silicon64(), Atoms("Si", positions=[[0.0, 0.0, 0.0]], cell=[20.0] * 3, pbc=False)):
        _assert_same(_predict(model, atoms), _predict(base, atoms), TOL[dtype])


def test_fused_convolution_parallel_mode():
    """SevenNet's parallel mode (LAMMPS): the ghost atoms' features join the senders and
    only the local atoms' rows are kept. Gradients too (forces), float64."""
    import sevenn._keys as KEY
    from e3nn.o3 import Irreps
    from sevenn.nn.convolution import IrrepsConvolution

    torch.manual_seed(0)
    irreps_x = Irreps("4x0e+4x1o")
    conv = IrrepsConvolution(irreps_x, Irreps("1x0e+1x1o+1x2e"), Irreps("4x0e+4x1o+4x2e"), [8, 16], denominator=3.0,
                             lazy_layer_instantiate=False, is_parallel=True).double()
    n_local, n_ghost, n_edges = 5, 3, 30
    edge_index = torch.stack([torch.randint(0, n_local, (n_edges,)),  # receivers, then senders
                              torch.randint(0, n_local + n_ghost, (n_edges,))])
    inputs = {KEY.NODE_FEATURE: (n_local, irreps_x.dim), KEY.NODE_FEATURE_GHOST: (n_ghost, irreps_x.dim),
              KEY.EDGE_ATTR: (n_edges, 9), KEY.EDGE_EMBEDDING: (n_edges, 8)}
    inputs = {k: torch.randn(shape, dtype=torch.float64, requires_grad=True) for k, shape in inputs.items()}

    def run(module):
        data = dict(inputs, **{KEY.EDGE_IDX: edge_index, KEY.NLOCAL: torch.tensor([n_local])})
        out = module(data)[KEY.NODE_FEATURE]
        wrt = list(inputs.values()) + list(module.weight_nn.parameters())
        return [out, *torch.autograd.grad((out ** 2).sum(), wrt)]

    expected = run(conv)  # e3nn's TorchScript code in it cannot be deep-copied: patched in place
    assert expected[0].shape[0] == n_local
    _assert_same(run(sparsekern.patch(conv, backend="torch")), expected, TOL[torch.float64])


def test_sparse_finetuning_step(sevennet64):
    """Sparse fine-tuning of the fused SevenNet-0 (float64, STR deltas at 5 %): the
    convolutions' weights come from their radial MLPs (the product has none), whose
    deltas get gradients from a force loss; then the model with its deltas computes what
    the merged, unpatched model does."""
    from sparsekern.finetune import iter_deltas

    config = sparsekern.SparseConfig(density=0.05, tile=(1, 1))  # element-wise: 8x8 tiles left the radial MLPs at 0
    model = sparsekern.prepare(copy.deepcopy(sevennet64), config, backend="torch")
    atoms = _silicon64()
    energy, forces, _ = (t.detach() for t in _predict(model, atoms))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(2):  # the first step is at density 0 (the base), the second on target
        optimizer.zero_grad()
        ((_predict(model, atoms)[1] - 1.1 * forces) ** 2).mean().backward()
        optimizer.step()
    radial = {}  # each convolution's radial MLP: did its deltas get gradients?
    for name, layer, _, d in iter_deltas(model):
        if isinstance(layer, RadialMLP):
            radial[name] = radial.get(name, False) or bool(d.v.grad.abs().max() > 0)
    assert len(radial) == 5 and all(radial.values())
    model.eval()
    tuned = _predict(model, atoms)
    merged = sparsekern.release(sparsekern.merge(copy.deepcopy(model)))
    assert not any(isinstance(m, SparsekernLayer) for m in merged.modules())
    _assert_same(tuned, _predict(merged, atoms), TOL[torch.float64])
    assert rel_err(tuned[0], energy) > 1e-8  # the steps moved the model


def test_fused_convolutions_share_one_flipped_graph(sevennet64):
    """SevenNet's edge_index is (receiver, sender); every fused block of one graph is given
    the same flipped copy, so the edge orderings the fused conv keeps with it are built once
    per graph, not per block."""
    model = sparsekern.patch(copy.deepcopy(sevennet64), backend="torch")
    convs = [m for n, m in model.named_modules() if n.endswith("_convolution")]
    seen = []
    for block in convs:
        forward = block.convolution.forward
        block.convolution.forward = lambda *a, forward=forward: seen.append(a[3]) or forward(*a)
    for _ in range(2):  # two graphs
        _predict(model, _silicon64())
    assert len(seen) == 2 * len(convs) > 2
    first, second = seen[:len(convs)], seen[len(convs):]
    assert all(e is first[0] for e in first) and all(e is second[0] for e in second) and first[0] is not second[0]


def test_family_stress_is_the_calculators(sevennet):
    """The fine-tuning family's stresses (3x3, ASE's sign) are what SevenNet's ASE
    calculator gives, patched or not."""
    from sevenn.calculator import SevenNetCalculator

    from sparsekern.integrations.base import family_for

    atoms = _silicon64()
    atoms.set_cell(atoms.cell * np.array([1.0, 1.02, 0.99]), scale_atoms=True)  # shear-free but anisotropic
    calc = atoms.copy()
    calc.calc = SevenNetCalculator(model=copy.deepcopy(sevennet), device="cpu")
    want = torch.as_tensor(calc.get_stress(voigt=False))
    family, model = family_for("7net-0"), copy.deepcopy(sevennet)
    for patched in (False, True):
        if patched:
            sparsekern.patch(model)
        got = family.outputs(model, family.collate([family.graph(model, atoms)], "cpu"), False, stress=True)
        assert rel_err(got["stress"][0].detach().double(), want) <= 2e-5


def test_a_model_that_cannot_be_downloaded_is_refused_in_one_line(monkeypatch):
    import requests
    from sevenn import util

    from sparsekern.integrations.sevennet import models

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Max retries exceeded\n(Failed to resolve 'github.com')")

    monkeypatch.setattr(util, "load_checkpoint", offline)
    for load in (models.load_sevennet, models.modalities):
        with pytest.raises(ValueError, match="SevenNet model '7net-omni': Max retries exceeded") as refused:
            load("7net-omni")
        assert "\n" not in str(refused.value) and "without internet, give 7net-0" in str(refused.value)


def test_sevennet_names_as_sevenn_takes_them_and_multi_fidelity_models_load(tmp_path):
    """sevenn takes SevenNet-0 in any case: so does the family; a multi-fidelity model
    loads (each graph names its modality), its modalities read from its checkpoint or the
    model; an unknown name and a file that is no checkpoint are refused in one line."""
    from sparsekern.integrations import family_for
    from sparsekern.integrations.sevennet import models

    family = family_for("SevenNet-0")
    assert family.name == family_for("7NET-0").name == "sevennet"
    assert family.fidelities("7net-mf-0") == family.fidelities(models.load_sevennet("7net-mf-0")) == ["PBE", "R2SCAN"]
    assert family.fidelities("7net-0") == family.fidelities(models.load_sevennet("7net-0")) == []
    with pytest.raises(ValueError, match="SevenNet model '7net-nope': Given 7net-nope does not exist") as refused:
        models.load_sevennet("7net-nope")
    assert "\n" not in str(refused.value) and "without internet" not in str(refused.value)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for load in (models.load_sevennet, models.modalities):  # (sevenn reads the file at its first use)
        with pytest.raises(ValueError, match="text.pth': invalid load key") as refused:
            load(str(tmp_path / "text.pth"))
        assert "without internet" not in str(refused.value)


def test_a_failed_patch_leaves_sevennet_as_it_was(monkeypatch):
    """SevenNet's sync-free reductions and fused convolution classes (the rule's
    before_patch and fuse_conv) are undone when a layer fails to build part way."""
    model = load_sevennet("7net-0")
    atoms = _structures()[0]
    want = _physics(model, atoms)
    assert [type(m) for m in model.modules()] == patch_failing_at(monkeypatch, model, ChannelwiseConv)
    got = _physics(model, atoms)  # (SevenNet's own forces vary at float32 round-off from call to call)
    assert got[0] == want[0] and rel_err(torch.as_tensor(got[1]), torch.as_tensor(want[1])) <= TOL[torch.float32]
