"""MACE with cuequivariance installed (reduced-CG symmetric contractions) and MACE
models converted to cuequivariance: sparsekern.integrations.mace.cueq.to_e3nn_in_place + sparsekern.patch
must give the cueq model's energies, forces and force-loss parameter gradients."""

import numpy as np
import pytest
import torch

pytest.importorskip("cuequivariance_torch")
pytest.importorskip("mace")

import cuequivariance as cue  # noqa: E402
import cuequivariance_torch as cuet  # noqa: E402
from ase.build import bulk  # noqa: E402
from e3nn import o3  # noqa: E402
from mace import data as mace_data  # noqa: E402
from mace.cli.convert_e3nn_cueq import run as run_e3nn_to_cueq  # noqa: E402
from mace.modules.wrapper_ops import CUET_AVAILABLE, with_cueq_conv_fusion  # noqa: E402
from mace.tools import AtomicNumberTable  # noqa: E402
from mace.tools.cg import O3_e3nn  # noqa: E402
from mace.tools.cg_cueq_tools import symmetric_contraction_proj  # noqa: E402
from mace.tools.torch_geometric.dataloader import DataLoader  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.integrations.mace import cueq  # noqa: E402
from sparsekern.layers import SparsekernLayer  # noqa: E402
from sparsekern.integrations.mace.models import mace_mp0_shaped  # noqa: E402

TOL = 1e-10
# MACE-MP-0 "small" layout (128x0e, max_ell 3, correlation 3, radial MLP 64x3) with 3
# elements, to keep the cueq conversion and the double backward quick on CPU.
SMALL = dict(r_max=4.2, num_elements=3, atomic_numbers=[6, 8, 14], atomic_energies=np.array([-1.1, -2.3, -3.5]))


@pytest.fixture(autouse=True)
def _threads_and_dtype():
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)  # MACE's converters set it globally


def _atoms(seed=0):
    atoms = bulk("Si", "diamond", a=5.43) * (2, 2, 2)  # 16 atoms
    atoms.positions += np.random.default_rng(seed).normal(0.0, 0.1, atoms.positions.shape)
    symbols = atoms.get_chemical_symbols()
    symbols[1], symbols[6], symbols[11] = "C", "O", "C"
    atoms.set_chemical_symbols(symbols)
    return atoms


def _batch(model, atoms):
    z_table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    torch.set_default_dtype(next(model.parameters()).dtype)  # as MACE does; the fixture restores it
    data = mace_data.AtomicData.from_config(mace_data.config_from_atoms(atoms), z_table=z_table,
                                            cutoff=float(model.r_max), heads=model.heads)
    batch = next(iter(DataLoader(dataset=[data], batch_size=1, shuffle=False, drop_last=False)))
    return batch.to_dict()


def _evaluate(model, batch):
    """Energy, forces (model's own forward) and d(force loss)/d(parameter) by name."""
    out = model({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()},
                training=True, compute_force=True)
    energy, forces = out["energy"], out["forces"]
    loss = (forces ** 2).sum() + 0.1 * (energy ** 2).sum()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    grads = {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(named, grads)}
    return energy.detach(), forces.detach(), grads


def _assert_close(got, ref, what, scale=None):
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    ref_scale = ref.abs().max().item() if ref.numel() else 0.0
    scale = max(ref_scale, scale or 0.0) or 1.0
    assert err <= TOL * scale, f"{what}: max abs error {err:.3e} vs scale {scale:.3e}"
    return err / scale


def _grads_in_cueq_space(model, grads):
    """Gradients of the e3nn model mapped to the cueq model's parameters: cuet.Linear
    weights are the e3nn ones with a leading 1; a cueq symmetric contraction's
    ``weight`` (z, a_cueq, u) becomes MACE's e3nn per-degree weights through
    W_e3nn = W_cueq @ pinv(P) (convert_cueq_e3nn), so dL/dW_cueq = dL/dW_e3nn @ pinv(P)^T."""
    mapped = dict(grads)
    for i, product in enumerate(model.products):
        sc = product.symmetric_contractions
        prefix = f"products.{i}.symmetric_contractions."
        suffixes = ["_max"] + [f".{j}" for j in range(len(sc.contractions[0].weights))]
        g = torch.cat([grads[f"{prefix}contractions.{k}.weights{s}"]
                       for k in range(len(sc.contractions)) for s in suffixes], dim=1)
        mapped = {n: v for n, v in mapped.items() if not n.startswith(prefix)}
        _, proj = symmetric_contraction_proj(
            cue.Irreps(O3_e3nn, str(o3.Irreps(x.ir for x in sc.irreps_in))),
            cue.Irreps(O3_e3nn, str(o3.Irreps(x.ir for x in sc.irreps_out))),
            list(range(1, len(sc.contractions[0].weights) + 2)))
        pinv = torch.tensor(np.linalg.pinv(proj), dtype=g.dtype)
        mapped[prefix + "weight"] = torch.einsum("zbu,ab->zau", g, pinv)
    return mapped


def _compare(got, ref, model=None):
    (e, f, g), (e_ref, f_ref, g_ref) = got, ref
    errors = {"energy": _assert_close(e, e_ref, "energy"), "forces": _assert_close(f, f_ref, "forces")}
    if model is not None:
        g = _grads_in_cueq_space(model, g)
    g = {n: v for n, v in g.items() if v.numel() or n in g_ref}
    assert set(g) == set(g_ref), f"parameters differ: {sorted(set(g) ^ set(g_ref))}"
    scale = max(v.abs().max().item() for v in g_ref.values() if v.numel())
    errors["grads"] = max(_assert_close(g[n].reshape(g_ref[n].shape), g_ref[n], f"grad {n}", 1e-6 * scale)
                          for n in g_ref)
    return errors


def _fuse_conv(model):
    """What MACE builds with conv_fusion on a GPU (cuequivariance_ops): the conv tensor
    product and the scatter fused into one cuet.SegmentedPolynomial called with
    ``(node_feats, edge_attrs, tp_weights, edge_index)``. On CPU the same polynomial runs
    with method='naive'; MACE uses it with the 'ir_mul' layout."""
    for block in model.interactions:
        tp = block.conv_tp
        poly = cue.descriptors.channelwise_tensor_product(
            cue.Irreps(O3_e3nn, str(tp.irreps_in1)), cue.Irreps(O3_e3nn, str(tp.irreps_in2)),
            cue.Irreps(O3_e3nn, str(tp.irreps_out)),
        ).flatten_coefficient_modes().squeeze_modes().polynomial
        fused = cuet.SegmentedPolynomial(poly, method="naive", math_dtype=torch.float64)
        fused.m.buffer_num_segments, fused.m.operand_extent = [1], 1  # read by with_cueq_conv_fusion only
        block.conv_tp = with_cueq_conv_fusion(fused)
        block.conv_fusion = True
    return model


@pytest.fixture(scope="module")
def atoms():
    return _atoms()


def test_reduced_cg_model(atoms):
    """MACE built where cuequivariance imports: use_reduced_cg symmetric contractions."""
    assert CUET_AVAILABLE
    model = mace_mp0_shaped("small", **SMALL)
    assert model.use_reduced_cg and not cueq.is_cueq_model(model)
    batch = _batch(model, atoms)
    ref = _evaluate(model, batch)
    assert cueq.to_e3nn_in_place(model) is model
    sparsekern.patch(model)
    assert {type(m).__name__ for m in model.modules() if isinstance(m, SparsekernLayer)} >= {
        "SymmetricContraction", "IrrepsLinear", "ElementLinear", "RadialMLP"}
    _compare(_evaluate(model, batch), ref)


@pytest.mark.parametrize("layout, fused, correlation", [
    ("mul_ir", False, 3),
    ("ir_mul", False, 3),
    ("ir_mul", True, 2),
])
def test_converted_model(atoms, layout, fused, correlation):
    e3nn_model = mace_mp0_shaped("small", **dict(SMALL, correlation=correlation))
    model = run_e3nn_to_cueq(e3nn_model, device="cpu", layout=layout)
    if fused:
        _fuse_conv(model)
    assert cueq.is_cueq_model(model) and not cueq.is_cueq_model(e3nn_model)
    kinds = {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("cuequivariance_torch")}
    assert {"Linear", "SymmetricContraction", "FullyConnectedTensorProduct"} <= kinds
    assert ("SegmentedPolynomial" if fused else "ChannelWiseTensorProduct") in kinds
    batch = _batch(model, atoms)
    ref = _evaluate(model, batch)
    radial = model.interactions[0].conv_tp_weights.layer0.weight

    assert cueq.to_e3nn_in_place(model) is model
    assert not cueq.is_cueq_model(model)
    assert not any(hasattr(b, "conv_fusion") for b in model.interactions)
    assert model.interactions[0].conv_tp_weights.layer0.weight is radial  # same Parameter object
    assert all(p.dtype == torch.float64 for p in model.parameters())
    sparsekern.patch(model)
    assert sparsekern.patching.last_report.left == []
    _compare(_evaluate(model, batch), ref, model)


@pytest.mark.parametrize("layout", ["mul_ir", "ir_mul"])
def test_unpatch_gives_the_cuequivariance_model_back(atoms, layout):
    """patch turns a cuequivariance model into e3nn layers; unpatch builds the
    cuequivariance model again: its modules, config, state-dict keys and shapes, and
    energies and forces (it stayed an e3nn model); trained weights go with it."""
    model = run_e3nn_to_cueq(mace_mp0_shaped("small", **dict(SMALL, correlation=2)), device="cpu", layout=layout)
    kinds = sorted(type(m).__name__ for m in model.modules())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    batch = _batch(model, atoms)
    ref = _evaluate(model, batch)
    radial = model.interactions[0].conv_tp_weights.layer0.weight
    sparsekern.patch(model)
    with torch.no_grad():  # training moves a weight of a cuet.Linear
        model.interactions[1].linear.weight.mul_(1.5)
    moved = _evaluate(model, batch)
    sparsekern.unpatch(model)
    assert cueq.is_cueq_model(model) and model.interactions[0].cueq_config.layout_str == layout
    assert sorted(type(m).__name__ for m in model.modules()) == kinds
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert model.interactions[0].conv_tp_weights.layer0.weight is radial  # same Parameter object
    energy, forces, _ = _evaluate(model, batch)
    _assert_close(energy, moved[0], "energy")
    _assert_close(forces, moved[1], "forces")
    assert abs(float(moved[0].sum() - ref[0].sum())) > 1e-6
    sparsekern.patch(model)  # and again
    _compare(_evaluate(model, batch), moved)


def test_calculator_keeps_working(atoms):
    from mace.calculators import MACECalculator

    model = run_e3nn_to_cueq(mace_mp0_shaped("small", **dict(SMALL, correlation=2)), device="cpu", layout="ir_mul")
    calc = MACECalculator(models=model, device="cpu", default_dtype="float64")
    assert calc.models[0] is model and not any(p.requires_grad for p in model.parameters())
    atoms = atoms.copy()
    atoms.calc = calc
    e_ref, f_ref = atoms.get_potential_energy(), atoms.get_forces()

    assert cueq.to_e3nn_in_place(calc.models[0]) is model
    sparsekern.patch(model)
    assert not any(p.requires_grad for p in model.parameters())  # requires_grad carried over
    calc.reset()
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    assert abs(e - e_ref) <= TOL * abs(e_ref)
    assert np.abs(f - f_ref).max() <= TOL * np.abs(f_ref).max()


def test_errors_and_no_op():
    lin = cuet.Linear(cue.Irreps("O3", "2x0e"), cue.Irreps("O3", "1x0e"), layout=cue.mul_ir, method="naive")
    not_mace = torch.nn.Sequential(lin)
    assert cueq.is_cueq_model(not_mace) and cueq.is_cueq_model(lin)
    with pytest.raises(TypeError, match="Sequential .*not a MACE model"):
        cueq.to_e3nn_in_place(not_mace)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        cueq.to_e3nn_in_place("model.model")
    assert not cueq.is_cueq_model(None)
    plain = torch.nn.Linear(2, 2)
    assert cueq.to_e3nn_in_place(plain) is plain


def test_a_float64_adapter_loads_onto_the_float32_cuequivariance_base(atoms, tmp_path):
    """An adapter trained on the float64 e3nn model goes onto that model cast to float32
    and converted to cuEquivariance (for speed): patch turns it back into e3nn layers,
    which moves the contraction's weights by float32 round-off, and the fingerprint
    allows that (it refused the base); a base with another contraction weight is refused."""
    import copy

    from sparsekern.finetune import SparseConfig, calibrate_density, iter_deltas

    base = mace_mp0_shaped("small", **dict(SMALL, hidden_irreps=o3.Irreps("8x0e+8x1o"), max_ell=2, correlation=2,
                                           radial_MLP=[8], MLP_irreps=o3.Irreps("4x0e")))  # (l = 1: a projection)
    trained = sparsekern.prepare(copy.deepcopy(base), SparseConfig(density=0.05, seed=1))
    with torch.no_grad():  # a trained state
        for *_, delta in iter_deltas(trained):
            delta.v.normal_(0, 1e-2, generator=torch.Generator().manual_seed(2))
    calibrate_density(trained)
    trained.eval()
    path = sparsekern.save_adapter(trained, tmp_path / "a.safetensors")
    energy = _evaluate(trained, _batch(trained, atoms))[0]
    fast = run_e3nn_to_cueq(copy.deepcopy(base).float(), device="cpu", layout="ir_mul")
    sparsekern.load_adapter(fast, path)
    fast.eval()
    got = _evaluate(fast, _batch(fast, atoms))[0].double()
    assert float((got - energy).abs().max()) <= 1e-5 * float(energy.abs().max())  # float32

    other = copy.deepcopy(base)
    with torch.no_grad():
        other.products[0].symmetric_contractions.contractions[0].weights_max.mul_(1.001)
    other = run_e3nn_to_cueq(other.float(), device="cpu", layout="ir_mul")
    with pytest.raises(ValueError, match="was made for a different base model"):
        sparsekern.load_adapter(other, path)
