"""Models of several fidelities fine-tuned at one (``--modal`` / ``--head``): a
multi-fidelity SevenNet (``7net-mf-0``, in the sevenn wheel: PBE and R2SCAN) and a
multi-head MACE. Each graph names the fidelity, the E0 shift goes into its row of the
model's per-element energies only, the adapter records it, and the merged file and the
adapter compute alike at every fidelity. Everything else is refused in one line."""

import json

import pytest
import torch
from ase.io import read, write
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparsekern.cli import main
from sparsekern.finetune import adapter_calculator, disable_adapter, load_adapter, set_adapter
from sparsekern.locations import data_dir


def _finetune(frames, out, *extra):
    return main(["finetune", "--model", "7net-mf-0", "--train", str(frames / "train.xyz"), "--test",
                 str(frames / "test.xyz"), "--method", "sparse", "--epochs", "1", "--out", str(out), "--no_progress",
                 *extra])


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    pytest.importorskip("sevenn")
    si = data_dir() / "si_mlearn" / "Si_train.xyz"
    if not si.exists():
        pytest.skip(f"real data missing: {si}")
    folder = tmp_path_factory.mktemp("mf")
    small = sorted(read(si, index=":"), key=len)[:2]  # the smallest cells keep it fast on CPU
    write(folder / "train.xyz", small[:1])
    write(folder / "test.xyz", small[1:])
    return folder


@pytest.fixture(scope="module")
def pbe_run(frames):
    out = frames / "pbe"
    assert _finetune(frames, out, "--modal", "PBE") == 0
    return out, json.loads((out / "metrics.json").read_text())


def _energy_forces(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def _metadata(adapter):
    with safe_open(adapter, "pt") as f:
        return f.metadata()


def test_a_run_at_one_modality_shifts_its_e0s_only_and_adapter_and_merged_file_agree(frames, pbe_run):
    from sparsekern.integrations.sevennet.models import calculator, load_sevennet

    out, metrics = pbe_run
    check = metrics["merged_model_check"]  # the merged file in SevenNetCalculator(modal="PBE")
    assert check["max_abs_energy_diff_ev"] <= 1e-4 and check["max_abs_force_diff_ev_per_A"] <= 1e-4
    metadata = _metadata(out / "adapter.safetensors")
    assert metadata["modal"] == "PBE"
    shift = json.loads(metadata["e0_shift_ev"])["14"]
    assert abs(shift) > 1e-3  # (the test frame is 8 atoms: a shift in the wrong row shows)

    base = load_sevennet("7net-mf-0")
    merged = torch.load(out / "merged_sevennet.pth", weights_only=False)["model_state_dict"]
    moved = merged["rescale_atomic_energy.shift"] - base.rescale_atomic_energy.shift.detach()
    pbe, r2scan, si = base.modal_map["PBE"], base.modal_map["R2SCAN"], base.type_map[14]
    assert torch.count_nonzero(moved[r2scan]) == 0 and torch.count_nonzero(moved[pbe]) == 1
    assert abs(float(moved[pbe, si]) - shift) <= 1e-6

    atoms = read(frames / "test.xyz")
    load_adapter(base, out / "adapter.safetensors")
    for modal, calc in (("PBE", adapter_calculator(base)), ("R2SCAN", adapter_calculator(base, modal="R2SCAN"))):
        energy, forces = _energy_forces(calc, atoms)
        energy_file, forces_file = _energy_forces(calculator(str(out / "merged_sevennet.pth"), modal=modal), atoms)
        assert abs(energy - energy_file) <= 1e-4 and abs(forces - forces_file).max() <= 1e-4, modal
    with disable_adapter(base):
        assert torch.equal(base.rescale_atomic_energy.shift, load_sevennet("7net-mf-0").rescale_atomic_energy.shift)

    # a calculator made at the active adapter's modality refuses to compute after a swap to
    # an adapter of another (its deltas at the first one's modality: a wrong energy)
    calc = adapter_calculator(base)
    save_file(load_file(out / "adapter.safetensors"), out / "r2scan.safetensors", {**metadata, "modal": "R2SCAN"})
    load_adapter(base, out / "r2scan.safetensors", name="r2scan")
    set_adapter(base, "r2scan")
    with pytest.raises(ValueError, match="computes at modal PBE, and the active adapter .* was trained at R2SCAN"):
        _energy_forces(calc, atoms)
    _energy_forces(adapter_calculator(base), atoms)


def test_modalities_are_refused_in_one_line(frames, pbe_run, tmp_path, capsys):
    from sparsekern.integrations.sevennet.models import load_sevennet

    refusals = {("--modal", "HSE"): "--modal/--head HSE: the model's fidelities are PBE, R2SCAN",
                (): "--modal/--head: the model has several fidelities (PBE, R2SCAN); name one"}
    for i, (extra, message) in enumerate(refusals.items()):
        assert _finetune(frames, tmp_path / str(i), *extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / str(i)).exists()
    assert main(["finetune", "--model", "7net-0", "--modal", "PBE", "--train", str(frames / "train.xyz"),
                 "--method", "sparse", "--out", str(tmp_path / "single")]) == 2
    assert "--modal/--head PBE: the model has one fidelity; leave it out" in capsys.readouterr().err
    out, _ = pbe_run
    assert _finetune(frames, out, "--modal", "R2SCAN") == 2
    assert "written for different arguments (modal: checkpoint 'PBE' vs now 'R2SCAN')" in capsys.readouterr().err

    metadata = _metadata(out / "adapter.safetensors")
    unshifted = {**metadata, "modal": "HSE", "e0_shift_ev": "{}"}  # (the modality checked, shift or not)
    save_file(load_file(out / "adapter.safetensors"), tmp_path / "hse.safetensors", unshifted)
    with pytest.raises(ValueError, match="hse.safetensors: its modal HSE: the model's fidelities are PBE, R2SCAN"):
        load_adapter(load_sevennet("7net-mf-0"), tmp_path / "hse.safetensors")
    with pytest.raises(ValueError, match=r"adapter_calculator: modal: the model has several fidelities \(PBE, R2SCAN"):
        adapter_calculator(load_sevennet("7net-mf-0"))


def test_the_report_names_the_model_and_its_modality(pbe_run, capsys):
    """``sparsekern report`` of the run's adapter says which model and fidelity it
    describes, and names 7net-mf-0 (not SevenNet-0) where the l = 2 question cannot be
    asked."""
    out, _ = pbe_run
    capsys.readouterr()
    assert main(["report", str(out / "adapter.safetensors")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("sparse (str) adapter pbe/adapter.safetensors of 7net-mf-0, modal PBE: ")
    assert "the model (7net-mf-0) has no element-indexed path weights" in text and "SevenNet-0" not in text
    report = json.loads((out / "adapter.report.json").read_text())
    assert (report["base_model"], report["modal"], report["method"]) == ("7net-mf-0", "PBE", "sparse (str)")


def test_a_multi_head_mace_trains_at_its_head(tmp_path, capsys):
    """The same for MACE's heads (per-head readouts, scales, shifts and E0s), in float64."""
    pytest.importorskip("mace")
    from mace.calculators import MACECalculator

    from helpers import write_tiny_mace_case

    write_tiny_mace_case(tmp_path, n_train=3, heads=["pbe", "r2scan"])

    def finetune(out, *extra):
        return main(["finetune", "--model", str(tmp_path / "tiny.model"), "--train", str(tmp_path / "train.xyz"),
                     "--test", str(tmp_path / "test.xyz"), "--method", "sparse", "--epochs", "1", "--lr", "0.02",
                     "--out", str(tmp_path / out), "--no_progress", *extra])

    assert finetune("none") == 2 and not (tmp_path / "none").exists()
    assert "--modal/--head: the model has several fidelities (pbe, r2scan); name one" in capsys.readouterr().err
    assert finetune("r2scan", "--head", "r2scan") == 0
    out = tmp_path / "r2scan"
    metrics = json.loads((out / "metrics.json").read_text())
    check = metrics["merged_model_check"]  # the merged file in MACECalculator(head="r2scan")
    assert check["max_abs_energy_diff_ev"] <= 1e-10 and check["max_abs_force_diff_ev_per_A"] <= 1e-10
    metadata = _metadata(out / "adapter.safetensors")
    shift = {int(z): v for z, v in json.loads(metadata["e0_shift_ev"]).items()}
    assert metadata["modal"] == "r2scan" and shift

    base = torch.load(tmp_path / "tiny.model", weights_only=False)
    merged = torch.load(out / "merged.model", weights_only=False)
    moved = merged.atomic_energies_fn.atomic_energies - base.atomic_energies_fn.atomic_energies
    assert torch.count_nonzero(moved[0]) == 0  # pbe's row
    assert torch.allclose(moved[1], torch.tensor([shift.get(13, 0.0), shift.get(29, 0.0)], dtype=moved.dtype))

    atoms = read(tmp_path / "test.xyz")
    load_adapter(base, out / "adapter.safetensors")
    for head, calc in (("r2scan", adapter_calculator(base)), ("pbe", adapter_calculator(base, modal="pbe"))):
        energy, forces = _energy_forces(calc, atoms)
        from_file = MACECalculator(model_paths=str(out / "merged.model"), head=head, default_dtype="float64")
        energy_file, forces_file = _energy_forces(from_file, atoms)
        assert abs(energy - energy_file) <= 1e-10 and abs(forces - forces_file).max() <= 1e-10, head


def test_a_magnetic_run_at_a_head_is_loaded_at_it(tmp_path, capsys):
    """``load_calculator`` takes the run's head: at it, the test frame's energy error is
    the run's (and at another head it is not); without one, refused in one line."""
    pytest.importorskip("mace")
    import numpy as np

    from helpers import write_tiny_mace_case
    from sparsekern.magnetism.calculator import load_calculator

    write_tiny_mace_case(tmp_path, n_train=3, heads=["pbe", "r2scan"])
    for name in ("train", "test"):
        frames = read(tmp_path / f"{name}.xyz", ":")
        for i, atoms in enumerate(frames):
            atoms.set_initial_magnetic_moments(np.where(atoms.numbers == 29, 0.5 + 0.1 * i, 0.0))
        write(tmp_path / f"{name}.xyz", frames)
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(tmp_path / "tiny.model"), "--train", str(tmp_path / "train.xyz"),
                 "--test", str(tmp_path / "test.xyz"), "--method", "sparse", "--epochs", "1", "--lr", "0.02",
                 "--head", "r2scan", "--magmom_key", "initial_magmoms", "--out", str(out), "--no_progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    with pytest.raises(ValueError, match=r"load_calculator: modal: the model has several fidelities \(pbe, r2scan\)"):
        load_calculator(out / "merged.model")
    atoms = read(tmp_path / "test.xyz")
    errors = {}
    for head in ("pbe", "r2scan"):
        energy, _ = _energy_forces(load_calculator(out / "merged.model", modal=head), atoms)
        errors[head] = 1e3 * abs(energy - atoms.info["REF_energy"]) / len(atoms)
    assert abs(errors["r2scan"] - metrics["test_energy_mae_mev_per_atom"]) <= 1e-6
    assert abs(errors["pbe"] - metrics["test_energy_mae_mev_per_atom"]) > 1.0
