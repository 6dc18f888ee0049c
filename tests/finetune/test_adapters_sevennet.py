"""Named adapters on SevenNet-0 in SevenNet's own calculator: a swap changes what the
running calculator computes (no reset), the adapter's E0 shift lands in SevenNet's
species-wise shift, and disabling gives the base's energy. SevenNet's calculator leaves
a model trainable: ``adapter_calculator``'s calculations and the trainer's evaluation
run it frozen for their time."""

import json

import pytest
import torch

pytest.importorskip("sevenn")
from ase.build import bulk  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.finetune import (adapter_calculator, calibrate_density, disable_adapter, iter_deltas,  # noqa: E402
                                 load_adapter, set_adapter)
from sparsekern.integrations import family_for  # noqa: E402


def test_swap_in_a_running_sevennet_calculator(tmp_path):
    family = family_for("7net-0")
    trained = sparsekern.prepare(family.load("7net-0", "cpu"), sparsekern.SparseConfig(density=0.03))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer, param, d in iter_deltas(trained):
            d.v.copy_(torch.randn(d.v.shape, generator=gen).to(d.v) * 0.1 * float(layer.get_parameter(param).std()))
    calibrate_density(trained)
    a = sparsekern.save_adapter(trained, tmp_path / "a.safetensors",
                                extra_metadata={"e0_shift_ev": json.dumps({"14": 0.5})})
    plain = sparsekern.save_adapter(trained, tmp_path / "plain.safetensors")

    model = family.load("7net-0", "cpu")
    base_shift = model.rescale_atomic_energy.shift.detach().clone()
    load_adapter(model, a, name="a")
    load_adapter(model, plain, name="plain")
    atoms = bulk("Si", "diamond", a=5.43) * (2, 1, 1)
    atoms.rattle(0.05, seed=1)
    atoms.calc = adapter_calculator(model)
    e_a = atoms.get_potential_energy()
    set_adapter(model, "plain")
    e_plain = atoms.get_potential_energy()
    with disable_adapter(model):
        e_base = atoms.get_potential_energy()
    assert abs(e_a - e_plain - 0.5 * len(atoms)) <= 1e-4  # the shift, at float32 round-off
    assert abs(e_plain - e_base) > 1e-3  # the delta moved the energy
    assert torch.equal(model.rescale_atomic_energy.shift, base_shift)  # the base's again, bit for bit
    # SevenNet's constants outside the path weights are the base's too: another shift,
    # scale or convolution denominator is another base model
    for name, edit in (("shift", lambda m: m.rescale_atomic_energy.shift.add_(1.0)),
                       ("scale", lambda m: m.rescale_atomic_energy.scale.mul_(2.0)),
                       ("denominator", lambda m: m._modules["0_convolution"].denominator.mul_(2.0))):
        other = family.load("7net-0", "cpu")
        with torch.no_grad():
            edit(other)
        with pytest.raises(ValueError, match="was made for a different base model"):
            load_adapter(other, a)


def test_calculations_run_frozen(tmp_path, monkeypatch):
    """SevenNet's calculator leaves the model trainable; ``adapter_calculator`` freezes it
    for each calculation only: the radial MLPs' folded weights are built by the first
    calculation and kept (not rebuilt for new positions), and the model is trainable after."""
    from sparsekern.ops.torch import radial_mlp

    family = family_for("7net-0")
    trained = sparsekern.prepare(family.load("7net-0", "cpu"), sparsekern.SparseConfig(density=0.03))
    calibrate_density(trained)
    model = load_adapter(family.load("7net-0", "cpu"), sparsekern.save_adapter(trained, tmp_path / "a.safetensors"))
    trainable = [p.requires_grad for p in model.parameters()]
    assert any(trainable)
    folds = []
    monkeypatch.setattr(radial_mlp, "effective", lambda w, d: folds.append(1) or (w if d is None else w + d.view_as(w)))
    atoms = bulk("Si", "diamond", a=5.43) * (2, 1, 1)
    atoms.calc = adapter_calculator(model)
    energies, built = [], []
    for seed in (1, 2):
        atoms.rattle(0.05, seed=seed)
        energies.append(atoms.get_potential_energy())
        built.append(len(folds))
        assert [p.requires_grad for p in model.parameters()] == trainable
    assert energies[0] != energies[1]
    assert built[0] > 0 and built[1] == built[0]


def test_evaluation_runs_frozen(monkeypatch):
    """The trainer's evaluation freezes the model for its time, as the calculator does:
    every batch computed with no parameter asking for a gradient, the trainable ones
    trainable again after."""
    from types import SimpleNamespace

    from ase.io import read

    from sparsekern.finetune import evaluation
    from sparsekern.finetune.data import Frame

    family = family_for("7net-0")
    model = sparsekern.prepare(family.load("7net-0", "cpu"), sparsekern.SparseConfig(density=0.03))
    trainable = [p.requires_grad for p in model.parameters()]
    atoms = bulk("Si", "diamond", a=5.43) * (2, 1, 1)
    atoms.rattle(0.05, seed=1)
    frames = [Frame(atoms, energy=-40.0, forces=torch.zeros(len(atoms), 3).numpy())] * 3
    seen = []
    outputs = family.outputs
    monkeypatch.setattr(family, "outputs", lambda *a: seen.append(any(p.requires_grad for p in model.parameters()))
                        or outputs(*a))
    errors = evaluation.evaluate(family, model, evaluation.make_samples(family, model, frames, {}),
                                 SimpleNamespace(device="cpu", batch_size=2, valid_batch_size=None, loss="weighted"))
    assert errors.force_mae_mev_per_A > 0
    assert seen == [False, False]  # two batches, both frozen
    assert [p.requires_grad for p in model.parameters()] == trainable


def test_a_checkpoint_of_older_names_exports(tmp_path):
    """7net-0_22May2024 stores its weights under names sevenn renames as it loads: the
    merged model is written against those (the export refused it after the whole run)."""
    from sevenn.calculator import SevenNetCalculator

    family = family_for("7net-0_22May2024")
    model = sparsekern.patch(family.load("7net-0_22May2024", "cpu"))
    path = family.export(model, {}, tmp_path / "merged.pth", "7net-0_22May2024")
    atoms = bulk("Si", "diamond", a=5.43) * (2, 1, 1)
    atoms.rattle(0.05, seed=0)
    energies = []
    for spec in ("7net-0_22May2024", str(path)):
        atoms.calc = SevenNetCalculator(spec, device="cpu")
        energies.append(atoms.get_potential_energy())
    assert energies[1] == pytest.approx(energies[0], abs=1e-4)
