"""``patch`` / ``unpatch`` on e3nn models that are neither MACE nor SevenNet: e3nn's own
example networks, a layer used under several names, moves after patching, and the
report of what was left."""

import copy

import pytest
import torch
from e3nn import o3

import sparsekern
from sparsekern.layers import IrrepsLinear
from helpers import patch_failing_at, rel_err


def _energy_forces(net, pos):
    pos = pos.clone().requires_grad_(True)
    energy = net({"pos": pos}).sum()
    return energy, torch.autograd.grad(energy, pos)[0]


def test_e3nn_gate_network_is_e3nn_s():
    """e3nn's gate_points network reads its self-connection's ``output_mask`` (it needs
    torch_geometric with e3nn 0.4: run in SevenNet's environment)."""
    Network = pytest.importorskip("e3nn.nn.models.gate_points_2101", exc_type=ImportError).Network
    torch.manual_seed(0)
    net = Network(irreps_in=None, irreps_hidden="8x0e+8x0o+4x1o+4x1e", irreps_out="1x0e", irreps_node_attr=None,
                  irreps_edge_attr="0e+1o+2e", layers=2, max_radius=3.0, number_of_basis=8, radial_layers=1,
                  radial_neurons=16, num_neighbors=3.0, num_nodes=6.0).double()
    patched = sparsekern.patch(copy.deepcopy(net), backend="torch")
    assert sparsekern.patching.last_report.replaced and not sparsekern.patching.last_report.left
    pos = torch.randn(6, 3, dtype=torch.float64) * 1.5
    for a, b in zip(_energy_forces(patched, pos), _energy_forces(net, pos)):
        assert rel_err(a, b) <= 1e-12


def test_a_layer_under_two_names_is_one_layer():
    """A shared e3nn layer (Sequential(lin, lin)) becomes one sparsekern layer under both
    names: one delta, and merge gives what the model with its delta computes."""
    torch.manual_seed(0)
    lin = o3.Linear("4x0e+2x1o", "4x0e+2x1o")
    model = torch.nn.Sequential(lin, lin).double()
    sparsekern.prepare(model, sparsekern.SparseConfig(density=0.5), backend="torch")
    assert isinstance(model[0], IrrepsLinear) and model[1] is model[0]
    assert [n for n, *_ in sparsekern.patching.last_report.replaced] == ["0", "1"]
    x = torch.randn(5, 10, dtype=torch.float64)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        (model(x) - 1).pow(2).sum().backward()
        optimizer.step()
    with torch.no_grad():
        tuned = model(x)
        sparsekern.merge(model)
        assert rel_err(model(x), tuned) <= 1e-12
    sparsekern.release(model)
    assert type(model[0]) is o3.Linear and model[1] is model[0]


def _external_weights_tp():
    return o3.TensorProduct("2x0e+2x1o", "1x0e+1x1o", "2x0e+2x1o+2x1e",
                            [(0, 0, 0, "uvu", True), (1, 1, 0, "uvu", True), (1, 0, 1, "uvu", True),
                             (1, 1, 2, "uvu", True)], shared_weights=False, internal_weights=False)


def test_unpatch_after_a_cast_of_layers_without_parameters():
    """A product with per-edge weights holds no parameters: its constants follow the
    model's casts while patched, and unpatch gives back a module in the model's dtype."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"tp": _external_weights_tp()})
    ref = copy.deepcopy(model).double()
    sparsekern.patch(model, backend="torch")
    model.double()
    x, y, w = (torch.randn(4, n, dtype=torch.float64) for n in (8, 4, 8))
    assert model["tp"].output_mask.dtype == torch.float64
    sparsekern.unpatch(model)
    assert rel_err(model["tp"](x, y, w), ref["tp"](x, y, w)) <= 1e-12
    assert {b.dtype for b in model.buffers()} == {torch.float64}


@pytest.mark.parametrize("case", ["layer", "norm", "features", "no path"])
def test_the_report_says_what_is_left_and_why(case):
    if case == "layer":  # patch swaps a model's submodules: the model object itself stays
        sparsekern.patch(o3.Linear("2x0e", "2x0e"))
        assert sparsekern.patching.last_report.left == [
            ("(the model)", "Linear", "a layer itself, not a model holding it: patch a module that contains it "
                                      "(torch.nn.Sequential(layer))")]
    elif case == "norm":  # o3.Norm's product has no weights at all
        sparsekern.patch(torch.nn.Sequential(o3.Norm("2x1o")))
        (name, cls, why), = sparsekern.patching.last_report.left
        assert (name, cls) == ("0.tp", "TensorProduct") and why.startswith("instruction mode 'uuu' without weights")
    elif case == "features":  # e3nn keeps f_in / f_out in the weight's shape only: the layer was replaced, then failed
        lin = o3.Linear("2x0e+1x1o", "3x0e+1x1o", f_in=2, f_out=3)
        model = torch.nn.Sequential(lin)
        x = torch.randn(4, 2, 5)
        sparsekern.patch(model)
        assert sparsekern.patching.last_report.left == [("0", "Linear", "f_in/f_out feature dimensions")]
        assert model[0] is lin and model(x).shape == (4, 3, 6)
    elif case == "no path":  # e3nn then reads no input, whatever its width (MACE's dipole readout gives it none)
        for lin in (o3.Linear("16x0e", "1x1o"), o3.Linear("0x1o", "2x0e+1x1o")):  # (the second: no input at all)
            model = torch.nn.Sequential(lin)
            sparsekern.patch(model)
            why = "no path from its input: its output is constant"
            assert sparsekern.patching.last_report.left == [("0", "Linear", why)]
            assert model[0] is lin and not model(torch.randn(4, 0)).any()


def test_a_patch_that_fails_leaves_the_model_as_it_was(monkeypatch):
    """A layer that fails to build after others were replaced: every module is put back."""
    from sparsekern.layers import ChannelwiseTP

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"lin": o3.Linear("2x0e+1x1o", "3x0e+1x1o"), "tp": _external_weights_tp()})
    before = dict(model.named_modules())
    patch_failing_at(monkeypatch, model, ChannelwiseTP)
    assert dict(model.named_modules()) == before


def test_torchscript_of_a_patched_model_says_why_it_cannot():
    model = torch.nn.Sequential(o3.Linear("2x0e+1x1o", "3x0e+1x1o"))
    sparsekern.patch(model, backend="torch")
    with pytest.raises(TypeError, match="sparsekern layers are not TorchScript; script the model unpatched"):
        torch.jit.script(model)
