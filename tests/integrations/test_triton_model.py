"""Whole small MACE and SevenNet models patched with backend="triton" (Triton interpreter
on CPU) against the torch back end: energies, forces and force-loss gradients."""

import copy

import pytest
import torch

from helpers import rel_err, sevennet_float64, triton_device

triton_device()  # skips where Triton cannot run; before the kernels are imported

from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402
from e3nn import o3  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.ops import registry  # noqa: E402

# the models stay on the CPU: the interpreter runs them (a GPU machine skips this file)
pytestmark = pytest.mark.skipif(not registry.BACKENDS["triton"].available(torch.device("cpu")),
                                reason="runs CPU tensors: needs TRITON_INTERPRET=1 (set before triton is imported)")


def _physics(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(batch, training=True, compute_force=True)
    loss = (out["forces"] ** 2).sum() + out["energy"].sum()
    return out["energy"].detach(), out["forces"].detach(), torch.autograd.grad(loss, params, allow_unused=True)


def _triton_twin(base, sparse):
    """(reference on the torch back end, its copy switched to triton), with the same
    sparse deltas attached when ``sparse``."""
    ref = sparsekern.patch(copy.deepcopy(base), backend="torch")
    if sparse:
        ref = sparsekern.prepare(ref, sparsekern.SparseConfig(density=0.2))
    ours = copy.deepcopy(ref)
    sparsekern.patch(ours, backend="triton")  # switches the back end of patched layers
    assert any(m.backend == "triton" for _, m in sparsekern.patched_layers(ours))
    return ref, ours


def _assert_same(got, expected):
    energy, forces, grads = got
    assert rel_err(energy, expected[0]) <= 1e-12
    assert rel_err(forces, expected[1]) <= 1e-12
    assert any(g is not None for g in grads)
    for a, b in zip(grads, expected[2]):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) <= 1e-10


def _small_mace_case():
    """A small MP-0-shaped MACE (3 elements, l up to 2), a rattled two-atom molecule and its batch."""
    pytest.importorskip("mace")
    from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped

    base = mace_mp0_shaped("small", seed=21, num_elements=3, hidden_irreps=o3.Irreps("4x0e+4x1o"),
                           max_ell=2, correlation=2, r_max=3.0, radial_MLP=[8])
    atoms = bulk("C", "diamond", a=3.57)[:1] * (2, 1, 1)
    atoms.pbc = False
    atoms.numbers = [1, 3]
    atoms.rattle(0.1, seed=1)
    batch = mace_batch(base, [atoms])
    return base, atoms, batch


@pytest.mark.parametrize("sparse", [False, True])
def test_mace_triton_matches_torch(sparse):
    base, atoms, batch = _small_mace_case()
    for p in base.parameters():
        p.requires_grad_(True)
    ref, ours = _triton_twin(base, sparse)
    _assert_same(_physics(ours, batch), _physics(ref, batch))


def _tiny_sevennet():
    """SevenNet's own builder (o3.Linear with biases, 'uvu' convolution with radial-MLP
    weights, FullyConnectedNet, Gate, self-connection FCTP on the one-hot) with 4
    channels, l <= 1, two convolutions, in float64."""
    import sevenn._keys as KEY
    from sevenn._const import DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG
    from sevenn.model_build import build_E3_equivariant_model

    cfg = copy.deepcopy(DEFAULT_E3_EQUIVARIANT_MODEL_CONFIG)
    cfg.update({KEY.CUTOFF: 3.0, KEY.NODE_FEATURE_MULTIPLICITY: 4, KEY.LMAX: 1, KEY.NUM_CONVOLUTION: 2,
                KEY.CONVOLUTION_WEIGHT_NN_HIDDEN_NEURONS: [8], KEY.NUM_SPECIES: 2, KEY.TYPE_MAP: {1: 0, 8: 1},
                KEY.CHEMICAL_SPECIES: ["H", "O"], KEY.CONV_DENOMINATOR: 4.0, KEY.SHIFT: 0.1, KEY.SCALE: 1.3,
                KEY.USE_BIAS_IN_LINEAR: True})
    torch.manual_seed(3)
    model = sevennet_float64(build_E3_equivariant_model(cfg))
    model.set_is_batch_data(False)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _sevennet_physics(model, atoms):
    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, 3.0))
    for k, v in data.items():
        if torch.is_tensor(v) and v.is_floating_point():
            data[k] = v.double()
    out = model(data)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = (out[KEY.PRED_FORCE] ** 2).sum() + out[KEY.PRED_TOTAL_ENERGY].sum()
    return (out[KEY.PRED_TOTAL_ENERGY].detach(), out[KEY.PRED_FORCE].detach(),
            torch.autograd.grad(loss, params, allow_unused=True))


class E3nnSevenNetShaped(torch.nn.Module):
    """SevenNet's (nequip-style) network from e3nn parts, for environments without
    sevenn: one-hot embedding by o3.Linear, then per interaction a self-connection
    FullyConnectedTensorProduct(x, one-hot), o3.Linear, a 'uvu' TensorProduct with
    weights from a FullyConnectedNet of a radial basis, scatter to receivers, o3.Linear,
    Gate; an o3.Linear readout with biases. 4 channels, l <= 1."""

    def __init__(self, n_el=2, mul=4, r_max=3.0, n_basis=4, n_layers=2):
        super().__init__()
        from e3nn import nn as e3nn_nn

        self.n_el, self.r_max, self.n_basis = n_el, r_max, n_basis
        self.irreps_sh = o3.Irreps.spherical_harmonics(1)
        self.embed = o3.Linear(f"{n_el}x0e", f"{mul}x0e")
        act = torch.nn.functional.silu
        self.layers = torch.nn.ModuleList()
        irreps_x = o3.Irreps(f"{mul}x0e")
        for _ in range(n_layers):
            gate = e3nn_nn.Gate(f"{mul}x0e", [act], f"{mul}x0e", [torch.sigmoid], f"{mul}x1o")
            mid, ins = [], []
            for i, (m, ir) in enumerate(irreps_x):
                for j, (_, ir_sh) in enumerate(self.irreps_sh):
                    for ir_out in ir * ir_sh:
                        if ir_out.l <= 1:
                            ins.append((i, j, len(mid), "uvu", True))
                            mid.append((m, ir_out))
            tp = o3.TensorProduct(irreps_x, self.irreps_sh, mid, ins, shared_weights=False, internal_weights=False)
            self.layers.append(torch.nn.ModuleDict({
                "self_connection": o3.FullyConnectedTensorProduct(irreps_x, f"{n_el}x0e", gate.irreps_in),
                "linear_1": o3.Linear(irreps_x, irreps_x),
                "tp": tp,
                "weight_nn": e3nn_nn.FullyConnectedNet([n_basis, 8, tp.weight_numel], act),
                "linear_2": o3.Linear(tp.irreps_out, gate.irreps_in),
                "gate": gate,
            }))
            irreps_x = gate.irreps_out
        self.readout = o3.Linear(irreps_x, "2x0e+1x0e", biases=True)  # biases on a two-block output

    def forward(self, pos, species, edge_index):
        src, dst = edge_index
        vec = pos[dst] - pos[src]
        r = vec.norm(dim=1, keepdim=True)
        sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
        n = torch.arange(1, self.n_basis + 1, dtype=pos.dtype)
        basis = torch.sin(n * torch.pi * r / self.r_max) / r * (1 - r / self.r_max) ** 2
        one_hot = torch.nn.functional.one_hot(species, self.n_el).to(pos.dtype)
        x = self.embed(one_hot)
        for layer in self.layers:
            sc = layer["self_connection"](x, one_hot)
            h = layer["linear_1"](x)
            m = layer["tp"](h[src], sh, layer["weight_nn"](basis))
            agg = torch.zeros(x.shape[0], m.shape[1], dtype=m.dtype).index_add(0, dst, m) / 3.0
            x = layer["gate"](layer["linear_2"](agg) + sc)
        return self.readout(x).sum()


def test_e3nn_sevennet_shaped_triton_matches_torch():
    torch.manual_seed(5)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        base = E3nnSevenNetShaped()
    finally:
        torch.set_default_dtype(prev)
    pos = torch.tensor([[0, 0, 0], [0.9, 0.2, 0.1], [0.1, 1.0, -0.2], [1.1, 1.1, 0.6]], dtype=torch.float64)
    species = torch.tensor([0, 0, 1, 0])
    edge_index = torch.tensor([[i, j] for i in range(4) for j in range(4) if i != j]).t()

    def physics(model):
        p = pos.clone().requires_grad_()
        energy = model(p, species, edge_index)
        (forces,) = torch.autograd.grad(-energy, p, create_graph=True)
        params = [q for q in model.parameters() if q.requires_grad]
        loss = (forces ** 2).sum() + energy
        return energy.detach(), forces.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    ref, ours = _triton_twin(base, sparse=True)
    from sparsekern.layers import ChannelwiseTP, ElementLinear, IrrepsLinear

    on_triton = {type(m) for _, m in sparsekern.patched_layers(ours) if m.backend == "triton"}
    assert {IrrepsLinear, ElementLinear, ChannelwiseTP} <= on_triton
    _assert_same(physics(ours), physics(ref))


@pytest.mark.parametrize("sparse", [False, True])
def test_sevennet_triton_matches_torch(sparse):
    pytest.importorskip("sevenn")
    from sparsekern.layers import ChannelwiseConv, ElementLinear, IrrepsLinear

    atoms = Atoms("H2OH", positions=[[0, 0, 0], [0.9, 0.2, 0.1], [0.1, 1.0, -0.2], [1.1, 1.1, 0.6]])
    ref, ours = _triton_twin(_tiny_sevennet(), sparse)
    on_triton = {type(m) for _, m in sparsekern.patched_layers(ours) if m.backend == "triton"}
    assert {IrrepsLinear, ElementLinear, ChannelwiseConv} <= on_triton  # SevenNet's convolution, fused
    _assert_same(_sevennet_physics(ours, atoms), _sevennet_physics(ref, atoms))


def test_frozen_model_reuses_what_it_derives_and_follows_changes():
    """Frozen (as MACE's calculator leaves a model): the deltas' values, their blocks and
    the contraction's folded weights are built once and reused, yet every result equals
    the unfrozen model's (which builds them at each call), also after weights and deltas
    change in place."""
    base, _, batch = _small_mace_case()
    ref = sparsekern.prepare(sparsekern.patch(copy.deepcopy(base), backend="triton"),
                             sparsekern.SparseConfig(density=0.2), backend="triton")
    ref.eval()
    frozen = copy.deepcopy(ref).requires_grad_(False)
    ref.requires_grad_(True)

    def energy_forces(model):
        out = model(dict(batch), compute_force=True)
        return out["energy"].detach(), out["forces"].detach()

    before = energy_forces(ref)
    for _ in range(2):
        got = energy_forces(frozen)
        assert rel_err(got[0], before[0]) <= 1e-12 and rel_err(got[1], before[1]) <= 1e-12
    for model in (ref, frozen):
        with torch.no_grad():
            for _, layer, _, delta in sparsekern.delta_slot.iter_deltas(model):
                delta.v.mul_(1.5)
            model.interactions[0].linear.weight.mul_(0.5)
            model.products[0].symmetric_contractions.contractions[0].weights_max.mul_(0.5)
    after = energy_forces(ref)
    assert rel_err(after[1], before[1]) > 1e-3
    got = energy_forces(frozen)
    assert rel_err(got[0], after[0]) <= 1e-12 and rel_err(got[1], after[1]) <= 1e-12
