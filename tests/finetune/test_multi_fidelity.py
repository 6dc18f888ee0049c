"""A multi-fidelity SevenNet (``7net-mf-0``, in the sevenn wheel: PBE and R2SCAN) fine-tuned
at one modality (``--modal``): each graph names it, the E0 shift goes into that modality's
row of the model's per-element energies only, the adapter records it, and the merged
file and the adapter compute alike at either modality. Everything else is refused in one
line."""

import json

import pytest
import torch

pytest.importorskip("sevenn")
from ase.io import read, write  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sparsekern.cli import main  # noqa: E402
from sparsekern.finetune import adapter_calculator, disable_adapter, load_adapter  # noqa: E402
from sparsekern.finetune.trainer import Settings, check  # noqa: E402
from sparsekern.integrations.sevennet.models import calculator, load_sevennet  # noqa: E402
from sparsekern.locations import data_dir  # noqa: E402


def _finetune(frames, out, *extra):
    return main(["finetune", "--model", "7net-mf-0", "--train", str(frames / "train.xyz"), "--test",
                 str(frames / "test.xyz"), "--method", "sparse", "--epochs", "1", "--out", str(out), "--no_progress",
                 *extra])


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
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


def test_a_run_at_one_modality_shifts_its_e0s_only_and_adapter_and_merged_file_agree(frames, pbe_run):
    out, metrics = pbe_run
    check = metrics["merged_model_check"]  # the merged file in SevenNetCalculator(modal="PBE")
    assert check["max_abs_energy_diff_ev"] <= 1e-4 and check["max_abs_force_diff_ev_per_A"] <= 1e-4
    with safe_open(out / "adapter.safetensors", "pt") as f:
        metadata = f.metadata()
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


def test_modalities_are_refused_in_one_line(frames, pbe_run, tmp_path, capsys):
    refusals = {("--modal", "HSE"): "--modal HSE: the model's modalities are PBE, R2SCAN",
                (): "--modal: the model is multi-fidelity; name its modality, one of PBE, R2SCAN"}
    for i, (extra, message) in enumerate(refusals.items()):
        assert _finetune(frames, tmp_path / str(i), *extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / str(i)).exists()
    assert main(["finetune", "--model", "7net-0", "--modal", "PBE", "--train", str(frames / "train.xyz"),
                 "--method", "sparse", "--out", str(tmp_path / "single")]) == 2
    assert "--modal PBE: the model has one fidelity (no modalities); leave it out" in capsys.readouterr().err
    graphed = Settings(model="7net-mf-0", modal="PBE", train=str(frames / "train.xyz"), test=None, method="sparse",
                       out=str(tmp_path / "graphed"))
    graphed.cuda_graphs = True  # (the settings refuse it on a CPU first)
    with pytest.raises(ValueError, match="--cuda_graphs: multi-fidelity sevennet models have no padded training step"):
        check(graphed)
    out, _ = pbe_run
    assert _finetune(frames, out, "--modal", "R2SCAN") == 2
    assert "written for different arguments (modal: checkpoint 'PBE' vs now 'R2SCAN')" in capsys.readouterr().err

    with safe_open(out / "adapter.safetensors", "pt") as f:
        metadata = f.metadata()
    save_file(load_file(out / "adapter.safetensors"), tmp_path / "hse.safetensors", {**metadata, "modal": "HSE"})
    with pytest.raises(ValueError, match="hse.safetensors: its modal HSE: the model's modalities are PBE, R2SCAN"):
        load_adapter(load_sevennet("7net-mf-0"), tmp_path / "hse.safetensors")
    with pytest.raises(ValueError, match="adapter_calculator: modal: the model is multi-fidelity; name its modality"):
        adapter_calculator(load_sevennet("7net-mf-0"))
