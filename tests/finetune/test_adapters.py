"""Named adapters on one base (sparse STR, block, LoRA): after ``set_adapter(X)`` the
model computes bit for bit what a base with only X loaded computes, and X's merged
model; ``disable_adapter`` gives the base; the E0 shift an adapter carries is applied
while it is active; a calculator on the model follows swaps; bad adapters and bad
names are one-line errors."""

import copy
import json

import pytest
import torch

pytest.importorskip("mace")
from ase.build import bulk  # noqa: E402
from e3nn import o3  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.cli import main as cli  # noqa: E402
from sparsekern.finetune.report import build_report  # noqa: E402
from sparsekern.finetune import (SparseConfig, adapter_calculator, calibrate_density, delete_adapter,  # noqa: E402
                                 disable_adapter, fingerprint, list_adapters, load_adapter, set_adapter)
from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped  # noqa: E402

SHIFT = {"1": 0.5, "26": -0.25}  # eV per atom of H and of Fe
CONFIGS = {"str": SparseConfig(density=0.05, seed=1), "block": SparseConfig(density=0.1, mode="block", tile=(4, 4)),
           "lora": SparseConfig(mode="lora", lora_rank=2, seed=2)}


@pytest.fixture(scope="module")
def base():
    # l = 2 per-element paths and two transition metals: the report's verdict has data
    return mace_mp0_shaped("small", seed=21, num_elements=4, atomic_numbers=[1, 8, 26, 28],
                           hidden_irreps=o3.Irreps("4x0e+4x2e"), max_ell=2, correlation=2, radial_MLP=[8])


@pytest.fixture(scope="module")
def atoms():
    a = bulk("C", "diamond", a=3.57)[:1] * (2, 2, 1)
    a.pbc = False
    a.rattle(0.1, seed=4)
    a.numbers = [1, 8, 26, 28]
    return a


def _make(base, mode, path, shift=None):
    """An adapter of ``mode`` with random nonzero deltas (a trained-looking one)."""
    model = sparsekern.prepare(copy.deepcopy(base), CONFIGS[mode])
    gen = torch.Generator().manual_seed(len(mode))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() > 0:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    calibrate_density(model)
    extra = {"e0_shift_ev": json.dumps(shift)} if shift else None
    return sparsekern.save_adapter(model, path, extra_metadata=extra)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    paths = {m: _make(base, m, d / f"{m}.safetensors", SHIFT if m == "str" else None) for m in CONFIGS}
    paths["str_unshifted"] = _make(base, "str", d / "str_unshifted.safetensors")
    return paths


def _out(model, atoms):
    out = model(mace_batch(model, [atoms]), compute_force=True)
    return out["energy"].detach(), out["forces"].detach()


def _merged_alone(base, path, atoms):
    """A fresh base with only this adapter, merged."""
    return _out(sparsekern.merge(load_adapter(copy.deepcopy(base), path)), atoms)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def refs(base, adapters, atoms):
    """Each adapter alone on a fresh base, merged; and the base."""
    out = {m: _merged_alone(base, adapters[m], atoms) for m in CONFIGS}
    out["base"] = _out(sparsekern.patch(copy.deepcopy(base)), atoms)
    assert not any(_equal(out[m], out["base"]) for m in CONFIGS)
    return out


def test_swaps_are_exact_and_disable_gives_the_base(base, adapters, atoms, refs):
    base_out = refs["base"]
    model = copy.deepcopy(base)
    for m in CONFIGS:
        load_adapter(model, adapters[m], name=m)
    assert [(a.name, a.active) for a in list_adapters(model)] == [("str", True), ("block", False), ("lora", False)]
    assert _equal(_out(model, atoms), refs["str"])  # the first loaded is active
    for m in ("lora", "block", "str", "lora"):
        set_adapter(model, m)
        assert _equal(_out(model, atoms), refs[m]), m
    with disable_adapter(model):
        assert _equal(_out(model, atoms), base_out)
        assert not any(a.active for a in list_adapters(model))
    assert _equal(_out(model, atoms), refs["lora"])
    set_adapter(model, "str")
    with disable_adapter(model):  # the E0 shift is taken off too
        assert _equal(_out(model, atoms), base_out)
    assert _equal(_out(model, atoms), refs["str"])
    # only the active adapter trains or counts: inactive ones are outside parameters()
    assert sparsekern.stats(model)["changed_params"] == sparsekern.stats(load_adapter(
        copy.deepcopy(base), adapters["str"]))["changed_params"]
    delete_adapter(model, "str")
    assert not any(a.active for a in list_adapters(model)) and _equal(_out(model, atoms), base_out)
    with pytest.raises(ValueError, match=r"no adapter named 'str' \(loaded: 'block', 'lora'\)"):
        set_adapter(model, "str")
    set_adapter(model, "block")
    assert _equal(_out(model, atoms), refs["block"])


def test_the_e0_shift_is_applied_while_active(base, adapters, atoms, tmp_path):
    model = load_adapter(copy.deepcopy(base), adapters["str"])
    shifted, _ = _out(model, atoms)
    plain, _ = _out(load_adapter(copy.deepcopy(base), adapters["str_unshifted"]), atoms)
    expected = sum(SHIFT.get(str(z), 0.0) for z in atoms.numbers)
    assert abs(float(shifted - plain) - expected) <= 1e-12
    # saved again from the model, the adapter keeps its shift
    again = sparsekern.save_adapter(model, tmp_path / "again.safetensors")
    assert torch.equal(_out(load_adapter(copy.deepcopy(base), again), atoms)[0], shifted)


def test_a_calculator_on_the_model_follows_swaps(base, adapters, atoms, refs):
    model = copy.deepcopy(base)
    load_adapter(model, adapters["str"], name="a")
    load_adapter(model, adapters["lora"], name="b")
    calc = adapter_calculator(model)
    a = atoms.copy()
    a.calc = calc
    energies = {}
    for name in ("a", "b", "a"):
        set_adapter(model, name)  # no calc.reset(): the swap drops the cached results
        energies.setdefault(name, []).append(a.get_potential_energy())
    with disable_adapter(model):
        e_base = a.get_potential_energy()
    for name, mode in (("a", "str"), ("b", "lora")):
        assert all(abs(e - float(refs[mode][0])) <= 1e-9 for e in energies[name])
    assert abs(e_base - float(refs["base"][0])) <= 1e-9
    assert abs(energies["a"][0] - energies["b"][0]) > 1e-3


def test_bad_names_and_states_are_one_line_errors(base, adapters):
    model = load_adapter(copy.deepcopy(base), adapters["str"])
    with pytest.raises(ValueError, match="an adapter named 'default' is already loaded"):
        load_adapter(model, adapters["lora"])
    sparsekern.merge(model)
    with pytest.raises(ValueError, match=r"merged; unmerge\(model\) first"):
        load_adapter(model, adapters["lora"], name="b")
    sparsekern.unmerge(model)
    prepared = sparsekern.prepare(copy.deepcopy(base), SparseConfig())
    with pytest.raises(ValueError, match="no named adapter's"):
        load_adapter(prepared, adapters["str"])
    with pytest.raises(ValueError, match=r"loaded: none"):
        set_adapter(copy.deepcopy(base), "x")


def test_merge_and_save_without_an_active_delta_say_why(base, adapters, tmp_path):
    """merge and save_adapter with nothing to fold or save (a plain base; adapters loaded
    but none active) refuse in one line, naming set_adapter where adapters are loaded,
    and leave the model as it was."""
    plain = copy.deepcopy(base)
    for call in (sparsekern.merge, lambda m: sparsekern.save_adapter(m, tmp_path / "a.safetensors")):
        with pytest.raises(ValueError, match="the model has no deltas"):
            call(plain)
    model = load_adapter(copy.deepcopy(base), adapters["str"], name="x")
    load_adapter(model, adapters["lora"], name="y")
    set_adapter(model, "y")
    delete_adapter(model, "y")
    said = r"no adapter is active \(loaded: 'x'\): activate one with set_adapter\(model, name\)"
    with pytest.raises(ValueError, match="merge: " + said):
        sparsekern.merge(model)
    with pytest.raises(ValueError, match="save_adapter: " + said):
        sparsekern.save_adapter(model, tmp_path / "a.safetensors")
    with disable_adapter(model), pytest.raises(ValueError, match="merge: " + said):
        sparsekern.merge(model)
    set_adapter(model, "x")  # (as the message says)
    sparsekern.unmerge(sparsekern.merge(model))
    assert not (tmp_path / "a.safetensors").exists()


def test_bad_arguments_are_one_line_errors(base, adapters, tmp_path):
    """Not a module, not a config, no name, a folder for a file, a CUDA-graph wrapper:
    one line each, naming what was given."""
    with pytest.raises(TypeError, match="patch takes a torch.nn.Module, got str 'model.model'"):
        sparsekern.patch("model.model")
    with pytest.raises(TypeError, match="load_adapter takes a torch.nn.Module, got str"):
        load_adapter("model.model", adapters["str"])
    with pytest.raises(TypeError, match=r"prepare takes a SparseConfig, got float 0.03 \(e.g. SparseConfig"):
        sparsekern.prepare(copy.deepcopy(base), 0.03)
    for name in (None, ""):  # (None was taken, applied nothing, and listed as active)
        with pytest.raises(ValueError, match="load_adapter: name must be a non-empty string"):
            load_adapter(copy.deepcopy(base), adapters["str"], name=name)
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not an adapter file"):
        load_adapter(copy.deepcopy(base), tmp_path / "folder")
    model = load_adapter(copy.deepcopy(base), adapters["str"])
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        sparsekern.save_adapter(model, tmp_path / "folder")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file is a file, not a folder"):
        sparsekern.save_adapter(model, tmp_path / "file" / "a.safetensors")
    with pytest.raises(TypeError, match=r"extra_metadata maps strings to strings .* got \{'a': 'int'\}"):
        sparsekern.save_adapter(model, tmp_path / "a.safetensors", extra_metadata={"a": 1})
    graphed = sparsekern.GraphedMACE(copy.deepcopy(base))
    with pytest.raises(ValueError, match=r"GraphedMACE wraps the model: give its .model"):
        load_adapter(graphed, adapters["str"])
    load_adapter(graphed.model, adapters["str"])  # (as the message says)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "a.safetensors").exists()


def test_an_adapter_refuses_a_base_whose_constants_differ(base, adapters, atoms, tmp_path):
    """The fingerprint covers the whole base, not the path weights alone: a base with
    other E0s, another scale or cutoff is refused (it gave other energies silently),
    while the base itself, cast to float32 or wrapped with magnetism's or not, loads."""
    edits = {"E0s": lambda b: b.atomic_energies_fn.atomic_energies.add_(1.0),
             "scale": lambda b: b.scale_shift.scale.mul_(2.0),
             "cutoff": lambda b: b.radial_embedding.bessel_fn.r_max.fill_(4.0)}
    for what, edit in edits.items():
        other = copy.deepcopy(base)
        with torch.no_grad():
            edit(other)
        with pytest.raises(ValueError, match="was made for a different base model"):
            load_adapter(other, adapters["str"])
    load_adapter(copy.deepcopy(base).float(), adapters["str"])
    # an adapter written before the scope was recorded (the path weights alone) still loads
    paths_only = _rewrite(adapters["str"], tmp_path / "paths.safetensors",
                          fingerprint=fingerprint(sparsekern.patch(copy.deepcopy(base)), scope="paths"),
                          fingerprint_scope=None)
    assert _equal(_out(load_adapter(copy.deepcopy(base), paths_only), atoms),
                  _out(load_adapter(copy.deepcopy(base), adapters["str"]), atoms))
    with pytest.raises(ValueError, match="its metadata are damaged .*fingerprint_scope 'all'"):
        load_adapter(copy.deepcopy(base), _rewrite(adapters["str"], tmp_path / "bad.safetensors",
                                                   fingerprint_scope="all"))


def _rewrite(path, out, **metadata):
    with safe_open(str(path), framework="pt") as f:
        meta = {**f.metadata(), **metadata}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata={k: v for k, v in meta.items() if v is not None})
    return out


def test_bad_adapter_files(base, adapters, tmp_path, atoms, capsys):
    path = adapters["str"]
    other = copy.deepcopy(base)
    with torch.no_grad():
        next(p for p in other.parameters() if p.dim() > 1).add_(1e-3)
    with pytest.raises(ValueError, match="made for a different base model"):
        load_adapter(other, path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable sparsekern adapter"):
        load_adapter(copy.deepcopy(base), truncated)
    future = _rewrite(path, tmp_path / "future.safetensors", version="7")
    with pytest.raises(ValueError, match=r"written by a newer sparsekern .*format 7 > 3"):
        load_adapter(copy.deepcopy(base), future)
    for bad, message in ((future, "format 7 > 3"), (truncated, "truncated")):  # the command line: one line
        capsys.readouterr()
        assert cli(["report", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1
    with safe_open(str(path), framework="pt") as f:  # an index below 0 would read another entry: refused
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k, t in tensors.items() if k.endswith(".index") and t.numel())
    tensors[key] = tensors[key].clone()
    tensors[key][0] = -5
    save_file(tensors, str(tmp_path / "negative.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(copy.deepcopy(base), tmp_path / "negative.safetensors")
    lora = adapters["lora"]  # damaged metadata: one line from load_adapter and report alike
    for name, metadata, says in (("noconfig", {"config": None}, "a LoRA adapter without its config"),
                                 ("rank0", {"config": '{"mode": "lora", "lora_rank": 0}'}, "lora_rank must be >= 1"),
                                 ("listed", {"config": "[1]"}, "is not a mapping"),
                                 ("dtype", {"fingerprint_dtype": "bogus"}, "fingerprint_dtype 'bogus'"),
                                 ("sketch", {"fingerprint_sketch": '{"w": [1.0]}'}, "fingerprint_sketch is not")):
        damaged = _rewrite(lora, tmp_path / f"{name}.safetensors", **metadata)
        with pytest.raises(ValueError, match="its metadata are damaged"):
            load_adapter(copy.deepcopy(base), damaged)
        capsys.readouterr()
        assert cli(["report", str(damaged)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.splitlines()) == 1, err
    # its own base cast to float32 takes it (and the float64 base a float32-made one)
    load_adapter(copy.deepcopy(base).float(), path)
    # adapters written before the fingerprint's precision was recorded hashed float64
    legacy = _rewrite(path, tmp_path / "legacy.safetensors", fingerprint=fingerprint(
        sparsekern.patch(copy.deepcopy(base)), "float64"), fingerprint_dtype=None)
    assert _equal(_out(load_adapter(copy.deepcopy(base), legacy), atoms),
                  _out(load_adapter(copy.deepcopy(base), path), atoms))


def test_report_on_lora_adapters_and_a_checked_base(base, adapters, tmp_path, capsys):
    """``sparsekern report`` counts the nonzeros of LoRA's B A update as ``stats`` does,
    and checks the adapter against ``--model`` (one line when it is another base)."""
    path = adapters["lora"]
    assert cli(["report", str(path), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "lora.report.json").read_text())
    expected = sparsekern.stats(load_adapter(copy.deepcopy(base), path))
    for key in ("total_params", "changed_params", "by_layer", "by_path", "by_l", "by_element", "by_element_l"):
        assert report[key] == expected[key], key
    assert 0 < report["changed_params"] and report["format"] == "sparsekern-lora-adapter"
    # every weight of a touched block changes: the count cannot answer the d-shell question
    assert report["d_shell"]["l2_larger_share_for_transition_metals"] is None
    assert "LoRA update" in report["d_shell"]["reason"]
    assert build_report(path, copy.deepcopy(base))["by_path"] == report["by_path"]  # its own base: accepted
    other = copy.deepcopy(base)
    with torch.no_grad():
        next(p for p in other.parameters() if p.dim() > 1).add_(1e-3)
    torch.save(other, tmp_path / "other.model")
    capsys.readouterr()
    never = tmp_path / "never"  # (refused before the output folder is made)
    assert cli(["report", str(path), "--out", str(never), "--model", str(tmp_path / "other.model")]) == 2
    err = capsys.readouterr().err
    assert "made for a different base model than the given base model" in err and len(err.splitlines()) == 1
    assert not never.exists()


def test_corrupt_entries_and_deltas_of_nan_are_refused(base, adapters, tmp_path, capsys):
    """Repeated or unsorted indices (a weight counted twice) and values of NaN: one line
    naming the tensor from load_adapter and report alike; save_adapter writes no adapter
    of NaN (a diverged run's)."""
    def damaged(mode, name, change):
        with safe_open(str(adapters[mode]), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        key = next(k for k, t in tensors.items() if k.endswith((".index", ".a")) and t.numel() > 1)
        key = key if change != "nan" or mode == "lora" else key.replace(".index", ".values")
        tensors[key] = tensors[key].clone()
        if change == "nan":
            tensors[key].view(-1)[1] = float("nan")
        else:
            tensors[key][1] = tensors[key][0]
        save_file(tensors, str(tmp_path / name), metadata=meta)
        return tmp_path / name, key

    for mode, name, change, says in (("str", "repeated.safetensors", "repeat", "are not strictly increasing"),
                                     ("str", "nan.safetensors", "nan", "holds NaN or infinity"),
                                     ("lora", "lora_nan.safetensors", "nan", "holds NaN or infinity")):
        path, key = damaged(mode, name, change)
        with pytest.raises(ValueError, match=says) as refused:
            load_adapter(copy.deepcopy(base), path)
        assert key.rsplit(".", 1)[0] in str(refused.value)
        capsys.readouterr()
        assert cli(["report", str(path), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert says in err and key.rsplit(".", 1)[0] in err and len(err.splitlines()) == 1, err
    model = sparsekern.prepare(copy.deepcopy(base), CONFIGS["lora"])
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(ValueError, match="save_adapter: the deltas hold NaN or infinity"):
        sparsekern.save_adapter(model, tmp_path / "diverged.safetensors")
    assert not (tmp_path / "diverged.safetensors").exists()
