"""MACE: the symmetric contraction layer, and whole models patched in place (the
real GST model and models with the MACE-MP-0 small / medium / large architecture):
energies, forces and force-loss gradients unchanged, and unpatch restores MACE."""

import copy
import io

import pytest
import torch

mace = pytest.importorskip("mace")
from ase.build import bulk  # noqa: E402
from ase.io import read  # noqa: E402
from e3nn import o3  # noqa: E402
from mace.modules.symmetric_contraction import SymmetricContraction as MaceSC  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.layers import SparsekernLayer, SymmetricContraction  # noqa: E402
from sparsekern.locations import data_dir, models_dir  # noqa: E402
from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped  # noqa: E402
from helpers import TOL, one_hot, patch_failing_at, random_o3, rel_err  # noqa: E402

SC_CASES = [("4x0e+4x1o+4x2e+4x3o", "4x0e+4x1o", 3, 3), ("5x0e+5x1o", "5x0e", 2, 1),
            ("3x0e+3x1o+3x2e", "3x0e+3x1o+3x2e", 3, 2)]


def _mace_sc(irreps_in, irreps_out, correlation, n_el, dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return MaceSC(o3.Irreps(irreps_in), o3.Irreps(irreps_out), correlation=correlation, num_elements=n_el)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("irreps_in,irreps_out,correlation,n_el", SC_CASES)
def test_symmetric_contraction_matches_mace(irreps_in, irreps_out, correlation, n_el, dtype):
    torch.manual_seed(0)
    ref = _mace_sc(irreps_in, irreps_out, correlation, n_el, dtype)
    ours = SymmetricContraction.from_e3nn(ref)
    ir = o3.Irreps(irreps_in)
    x = torch.randn(11, ir.count((0, 1)), sum(i.dim for _, i in ir), dtype=dtype)
    attrs = one_hot(11, n_el, dtype)
    assert rel_err(ours(x, attrs), ref(x, attrs)) <= TOL[dtype]
    empty = x[:0].clone().requires_grad_(True)
    y = ours(empty, attrs[:0])  # in the graph: zero gradients
    assert y.shape == (0, o3.Irreps(irreps_out).dim) and torch.autograd.grad(y.sum(), empty)[0].shape == empty.shape


@pytest.mark.parametrize("use_reduced_cg", [False, True])
def test_symmetric_contraction_both_parametrisations(use_reduced_cg):
    """Reduced and full CG bases (different U tensors) at correlation 4: the kept
    monomials and the symmetrised U must cover every term."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = MaceSC(o3.Irreps("3x0e+3x1o"), o3.Irreps("3x0e+3x1o"), correlation=4, num_elements=3,
                     use_reduced_cg=use_reduced_cg)
    finally:
        torch.set_default_dtype(previous)
    ours = SymmetricContraction.from_e3nn(ref)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    attrs = one_hot(7, 3)
    assert rel_err(ours(x, attrs), ref(x, attrs)) <= TOL[torch.float64]

def test_symmetric_contraction_correlation_per_output():
    """Outputs of different correlation (MACE's per-irrep form; here its 1o contraction
    swapped for a correlation-2 one): the missing degree contributes nothing."""
    torch.manual_seed(0)
    ref = _mace_sc("3x0e+3x1o+3x2e", "3x0e+3x1o", 3, 2, torch.float64)
    ref.contractions[1] = _mace_sc("3x0e+3x1o+3x2e", "3x0e+3x1o", 2, 2, torch.float64).contractions[1]
    ours = SymmetricContraction.from_e3nn(ref)
    x = torch.randn(5, 3, 9, dtype=torch.float64)
    attrs = one_hot(5, 2)
    assert rel_err(ours(x, attrs), ref(x, attrs)) <= TOL[torch.float64]

def test_symmetric_contraction_grads_and_equivariance():
    torch.manual_seed(0)
    ref = _mace_sc("2x0e+2x1o", "2x0e+2x1o", 3, 2, torch.float64)
    layer = SymmetricContraction.from_e3nn(ref)
    attrs = one_hot(3, 2)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x, attrs))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (x, *params), eps=1e-6, atol=1e-7)

    rot = random_o3()
    d_in = o3.Irreps("0e+1o").D_from_matrix(rot)  # acts on the coupling index of each channel
    d_out = o3.Irreps("2x0e+2x1o").D_from_matrix(rot)
    with torch.no_grad():
        assert rel_err(layer(x @ d_in.T, attrs), layer(x, attrs) @ d_out.T) <= 1e-12


def test_symmetric_contraction_differentiates_the_attributes():
    """Where node_attrs need a gradient (an alchemical derivative), MACE's product is linear
    in them: the gradient, and its derivative in x, are MACE's."""
    torch.manual_seed(0)
    ref = _mace_sc("2x0e+2x1o+2x2e", "2x0e+2x1o", 3, 3, torch.float64)
    layer = SymmetricContraction.from_e3nn(ref)
    x = torch.randn(5, 2, 9, dtype=torch.float64, requires_grad=True)
    attrs = one_hot(5, 3).requires_grad_(True)
    grads = [torch.autograd.grad(m(x, attrs).pow(2).sum(), (x, attrs), create_graph=True) for m in (ref, layer)]
    for a, b in zip(*grads):
        assert rel_err(b, a) <= 1e-12
    mixed = [torch.autograd.grad(g[1].pow(2).sum(), x, retain_graph=True)[0] for g in grads]
    assert rel_err(mixed[1], mixed[0]) <= 1e-12
    through_x = [torch.autograd.grad(g[0].pow(2).sum(), attrs, retain_graph=True)[0] for g in grads]
    assert through_x[0].abs().max() > 0 and rel_err(through_x[1], through_x[0]) <= 1e-12  # d(forces)/d(attrs)'s kind
    weights = [list(m.parameters()) for m in (ref, layer)]
    assert [w.shape for w in weights[0]] == [w.shape for w in weights[1]]
    u = [torch.randn_like(w) for w in weights[0]]
    through_w = [torch.autograd.grad(sum((g * v).sum() for g, v in zip(torch.autograd.grad(
        m(x, attrs).pow(2).sum(), ws, create_graph=True), u)), attrs)[0] for m, ws in zip((ref, layer), weights)]
    assert through_w[0].abs().max() > 0 and rel_err(through_w[1], through_w[0]) <= 1e-12
    forward = [torch.func.jvp(lambda a: m(x.detach(), a), (attrs.detach(),), (torch.ones_like(attrs),))[1]
               for m in (ref, layer)]  # forward mode
    assert forward[0].abs().max() > 0 and rel_err(forward[1], forward[0]) <= 1e-12


def _energy_forces_grads(model, batch):
    """Energy, forces, stress and the parameters' gradients of a loss of all three (the
    training of forces and stresses: double backward through positions and strain)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(batch, training=True, compute_force=True, compute_stress=True)
    assert out["stress"].abs().max() > 0
    loss = (out["forces"] ** 2).sum() + out["energy"].sum() + 1e4 * (out["stress"] ** 2).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return out["energy"].detach(), out["forces"].detach(), grads, out["stress"].detach()


def _assert_same_physics(model, batch, tol):
    for p in model.parameters():
        p.requires_grad_(True)
    ref = _energy_forces_grads(model, batch)
    names_before = [n for n, _ in model.named_parameters()]
    ids_before = [id(p) for p in model.parameters()]
    assert sparsekern.patch(model) is model
    assert sparsekern.patched_layers(model), "nothing was patched"
    assert [n for n, _ in model.named_parameters()] == names_before
    assert [id(p) for p in model.parameters()] == ids_before  # the very same Parameter objects
    got = _energy_forces_grads(model, batch)
    assert rel_err(got[0], ref[0]) <= tol
    assert rel_err(got[1], ref[1]) <= tol
    assert rel_err(got[3], ref[3]) <= tol
    for g, r in zip(got[2], ref[2]):
        assert (g is None) == (r is None)
        if g is not None:
            assert rel_err(g, r) <= tol
    sparsekern.unpatch(model)
    assert not any(isinstance(m, SparsekernLayer) for m in model.modules())
    assert not any(hasattr(m, "conv_fusion") for m in model.modules())
    back = _energy_forces_grads(model, batch)
    assert rel_err(back[1], ref[1]) <= 1e-14


def _crystal(seed=0, elements=(14, 14, 32, 6)):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=seed)
    atoms.numbers = [elements[i % len(elements)] for i in range(len(atoms))]
    return atoms


def test_real_gst_model():
    path = models_dir() / "mace_gst_small.model"
    frames = data_dir() / "gst" / "gst_frames_000_099.xyz"
    if not path.exists() or not frames.exists():
        pytest.skip(f"real model or data missing: {path}, {frames}")
    model = torch.load(path, weights_only=False, map_location="cpu")
    batch = mace_batch(model, read(frames, index="90:91"))  # frames not used elsewhere in tests
    _assert_same_physics(model, batch, 1e-10)


@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_mp0_shaped_models(size):
    model = mace_mp0_shaped(size, seed=1)
    batch = mace_batch(model, [_crystal(seed=2)])
    _assert_same_physics(model, batch, 1e-10)


def test_attributes_gradient_is_mace_s_and_invariant():
    """A whole MACE with node_attrs needing a gradient (an alchemical derivative): dE/d(attrs)
    and d|forces|^2/d(attrs) are MACE's, and both are unchanged by a rotation with inversion
    of the atoms."""
    ref = mace_mp0_shaped("small", seed=6, num_elements=10)
    model = sparsekern.patch(copy.deepcopy(ref), backend="torch")
    cluster = _crystal(seed=7, elements=(1, 6, 8))
    cluster.pbc, cluster.cell = False, None

    def gradient(m, positions):
        cluster.positions = positions
        batch = mace_batch(m, [cluster])
        attrs = batch["node_attrs"].requires_grad_(True)
        return torch.autograd.grad(m(batch, compute_force=False)["energy"].sum(), attrs)[0]

    def through_forces(m):  # d|forces|^2 / d(attrs): through the forces' graph
        batch = mace_batch(m, [cluster])
        attrs = batch["node_attrs"].requires_grad_(True)
        forces = m(batch, training=True, compute_force=True)["forces"]
        return torch.autograd.grad(forces.pow(2).sum(), attrs)[0]

    positions = cluster.positions.copy()
    want = gradient(ref, positions)
    assert want.abs().max() > 0 and rel_err(gradient(model, positions), want) <= 1e-12
    want_forces = through_forces(ref)
    assert rel_err(through_forces(model), want_forces) <= 1e-12
    turned = positions @ random_o3(seed=8).numpy().T
    assert rel_err(gradient(model, turned), want) <= 1e-10
    assert rel_err(through_forces(model), want_forces) <= 1e-10  # (at the turned positions: invariant)


def test_float32_model_moved_to_float64():
    """mace_mp(default_dtype='float64') builds in float32 and calls .double()."""
    model = mace_mp0_shaped("small", seed=3, dtype=torch.float32, num_elements=10).double()
    batch = mace_batch(model, [_crystal(seed=4, elements=(1, 6, 8))])
    _assert_same_physics(model, batch, 1e-10)


def test_zero_edges_and_optimizer_continuity():
    model = mace_mp0_shaped("small", seed=5, num_elements=10)
    atoms = bulk("Si", "diamond", a=5.43)[:1]
    atoms.numbers = [6]
    atoms.center(vacuum=10.0)  # one isolated atom: no edges
    batch = mace_batch(model, [atoms])
    assert batch["edge_index"].shape[1] == 0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sparsekern.patch(model)
    out = model(batch, training=True, compute_force=True)
    assert torch.isfinite(out["energy"]).all() and not out["forces"].any()
    out["energy"].sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # the optimizer made before patching updates the patched layers
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_state_dict_is_mace_s():
    """A patched model's state dict has MACE's keys (the replaced modules are kept
    unregistered: no second name for the same tensors), so MACE loads it strictly; one
    written while they were registered still loads into a patched model."""
    model = mace_mp0_shaped("small", seed=6, num_elements=5)
    keys = set(model.state_dict())
    sparsekern.patch(model)
    state = model.state_dict()
    assert set(state) == keys
    mace_mp0_shaped("small", seed=7, num_elements=5).load_state_dict(state)
    old = dict(state)
    for name, layer in sparsekern.patched_layers(model):
        old.update({f"{name}._replaced.{k}": v for k, v in layer._replaced.state_dict().items()})
    assert len(old) > len(state)
    model.load_state_dict(old)
    mask = next(k for k in state if k.endswith("output_mask") and k not in dict(model.named_buffers()))
    with pytest.raises(RuntimeError, match=f"size mismatch for {mask}"):
        model.load_state_dict({**state, mask: torch.ones(3)})


def test_patch_report_and_pickle(capsys):
    model = mace_mp0_shaped("small", seed=6, num_elements=5)
    sparsekern.patch(model, verbose=True)
    text = capsys.readouterr().out
    assert "skip_tp: FullyConnectedTensorProduct -> ElementLinear [torch]" in text
    assert "conv_tp: TensorProduct -> ChannelwiseConv" in text
    buf = io.BytesIO()
    torch.save(model, buf)  # a patched model pickles, as MACE saves models whole
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    batch = mace_batch(again, [_crystal(seed=7, elements=(1, 2, 3))])
    ref = copy.deepcopy(again)
    sparsekern.unpatch(ref)
    e1 = again(batch, compute_force=True)["energy"]
    e2 = ref(batch, compute_force=True)["energy"]
    assert rel_err(e1, e2) <= 1e-12
    with pytest.raises(ValueError, match="unknown backend"):
        sparsekern.patch(model, backend="fastest")
    with pytest.raises(RuntimeError, match="not available"):
        sparsekern.patch(model, backend="cuda")


def test_dipole_model_with_mace_s_default_mlp_irreps():
    """AtomicDipolesMACE at mace_run_train's default --MLP_irreps 16x0e: its dipole
    readout's gate is empty and its last linear, which has no path, is given a width-0
    input (e3nn reads none): that linear is left, with its reason, and the dipoles are e3nn's."""
    from mace import modules

    from sparsekern.integrations.mace.models import default_dtype

    with default_dtype(torch.float64):
        torch.manual_seed(0)
        model = modules.AtomicDipolesMACE(
            r_max=3.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=modules.RealAgnosticResidualInteractionBlock,
            interaction_cls_first=modules.RealAgnosticInteractionBlock, num_interactions=2, num_elements=2,
            hidden_irreps=o3.Irreps("4x0e+4x1o"), MLP_irreps=o3.Irreps("16x0e"), avg_num_neighbors=3.0,
            atomic_numbers=[1, 8], correlation=2, gate=torch.nn.functional.silu, atomic_energies=None)
    from ase import Atoms

    batch = mace_batch(model, [Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])])
    want = model(dict(batch))["dipole"]
    sparsekern.patch(model, backend="torch")
    left = [why for *_, why in sparsekern.patching.last_report.left]
    assert "no path from its input: its output is constant" in left
    assert rel_err(model(dict(batch))["dipole"], want) <= 1e-12 and want.abs().max() > 0


def test_mace_lora_wrappers_are_left_whole():
    """A model with MACE's own LoRA (mace_run_train --lora): its wrappers read the e3nn
    layers they hold (their .instructions, .weight), so they are left whole, with the
    reason, and the rest is patched: energies and forces are MACE's, with and without
    gradients (the wrappers merge their weights under no_grad)."""
    from mace.modules.lora import inject_LoRAs

    model = mace_mp0_shaped("small", seed=1)
    inject_LoRAs(model, rank=2)
    batch = mace_batch(model, [_crystal(seed=2)])
    want = model(dict(batch), training=True, compute_force=True)
    sparsekern.patch(model, backend="torch")
    left = [why for *_, why in sparsekern.patching.last_report.left if why.startswith("MACE's LoRA wrapper")]
    assert left and sparsekern.patched_layers(model)
    got = model(dict(batch), training=True, compute_force=True)
    assert rel_err(got["forces"], want["forces"]) <= 1e-10 and rel_err(got["energy"], want["energy"]) <= 1e-12
    model.eval()
    with torch.no_grad():
        assert rel_err(model(dict(batch), compute_force=False)["energy"], want["energy"]) <= 1e-12


def test_a_failed_patch_leaves_the_interaction_blocks_unfused(monkeypatch):
    """The fused conv fails to build after its block took MACE's conv_fusion: the block
    is unfused again, and the model runs as before."""
    from sparsekern.layers import ChannelwiseConv

    model = mace_mp0_shaped("small", seed=1)
    batch = mace_batch(model, [_crystal(seed=2)])
    want = model(dict(batch), compute_force=False)["energy"]
    types = patch_failing_at(monkeypatch, model, ChannelwiseConv)
    assert [type(m) for m in model.modules()] == types and not any(hasattr(m, "conv_fusion") for m in model.modules())
    assert torch.equal(model(dict(batch), compute_force=False)["energy"], want)
