"""``sparsekern mace-train``: MACE's own training on a tiny foundation model and a few
EMT-labelled frames; only deltas train, the saved .model is plain MACE (loads in
MACECalculator), the adapter on the untouched foundation reproduces it; --lora runs
MACE's LoRA with nothing of ours applied."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mace")
from ase.build import bulk  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.io import write  # noqa: E402
from e3nn import o3  # noqa: E402
from safetensors import safe_open  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.cli import main as cli  # noqa: E402
from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped  # noqa: E402
from helpers import rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _frames(n, seed=0):
    out = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.numbers[i % 4] = 13  # Al
        atoms.rattle(0.05, seed=seed + i)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mace_train")
    # scale 1 and shift 0 per head, E0s taken from it, all its elements kept: MACE then
    # fine-tunes the foundation exactly as it is
    foundation = mace_mp0_shaped("small", seed=5, num_elements=2, atomic_numbers=[13, 29],
                                 hidden_irreps=o3.Irreps("4x0e+4x1o"), max_ell=1, correlation=2, radial_MLP=[8],
                                 r_max=4.0, atomic_inter_scale=[1.0], atomic_inter_shift=[0.0])
    torch.save(foundation, d / "foundation.model")
    frames = _frames(6)
    write(d / "train.xyz", frames[:4])
    write(d / "valid.xyz", frames[4:])
    return d, foundation


def _mace_train(d, name, *extra):
    run = _run_mace_train(d, name, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    return d / name


def _run_mace_train(d, name, *extra):
    args = ["--name", name, "--train_file", "train.xyz", "--valid_file", "valid.xyz",
            "--foundation_model", "foundation.model", "--foundation_model_elements", "True", "--E0s", "foundation",
            "--scaling", "no_scaling", "--max_num_epochs", "1", "--batch_size", "2", "--valid_batch_size", "2",
            "--device", "cpu", "--default_dtype", "float64", "--lr", "0.01", "--seed", "1", "--plot", "False",
            "--work_dir", str(d / name), *extra]
    return subprocess.run([sys.executable, "-m", "sparsekern", "mace-train", *args], cwd=d, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sparse_mace_train_saves_plain_model_and_adapter(workdir):
    d, foundation = workdir
    out = _mace_train(d, "sparse", "--sparse_density", "0.05", "--sparse_lr_factor", "3", "--ema", "--ema_decay", "0.9")
    model_file, adapter = out / "sparse.model", out / "sparse.adapter.safetensors"
    assert model_file.is_file() and adapter.is_file()
    assert not (out / "sparse.base.model").exists()  # the foundation itself is the base
    with safe_open(str(adapter), framework="pt") as f:
        assert f.metadata()["base_model"] == str((d / "foundation.model").resolve())  # (not relative to the run)

    # a plain MACE model: no sparsekern class, hook or attribute pickled in it
    assert b"sparsekern" not in model_file.read_bytes()
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model_file), device="cpu", default_dtype="float64")
    tuned = calc.models[0]
    atoms = _frames(1, seed=40)[0]
    atoms.calc = calc
    calc_energy = atoms.get_potential_energy()

    # the foundation file is untouched; the adapter on it reproduces the .model
    on_disk = torch.load(d / "foundation.model", weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(on_disk.state_dict().values(), foundation.state_dict().values()))
    adapted = sparsekern.load_adapter(copy.deepcopy(on_disk), adapter)
    batch = mace_batch(tuned, [atoms])
    want = tuned(batch, compute_force=True)
    got = adapted(mace_batch(adapted, [atoms]), compute_force=True)
    assert rel_err(got["energy"], want["energy"]) <= 1e-12 and rel_err(got["forces"], want["forces"]) <= 1e-12
    base_energy = on_disk(mace_batch(on_disk, [atoms]), compute_force=True)["energy"]
    assert rel_err(base_energy, want["energy"]) > 1e-9  # the fine-tuning changed the model
    assert calc_energy == pytest.approx(float(want["energy"]), rel=1e-9)  # its own neighbour list: another sum order
    s = sparsekern.stats(adapted)
    assert abs(s["density"] - 0.05) <= 0.1 * 0.05

    # only the adapter's entries differ between the .model and the foundation
    with safe_open(str(adapter), framework="pt") as f:
        index = {k[: -len(".index")]: f.get_tensor(k).long() for k in f.keys() if k.endswith(".index")}
    changed_entries = 0
    for name, p in tuned.state_dict().items():
        diff = (p.reshape(-1) != on_disk.state_dict()[name].reshape(-1)).nonzero().view(-1)
        if diff.numel():
            assert name in index and set(diff.tolist()) <= set(index[name].tolist()), name
            changed_entries += diff.numel()
    assert changed_entries > 0.8 * s["changed_params"]

    # the optimizer held the deltas only; thresholds without weight decay
    ckpt = torch.load(next((out / "checkpoints").glob("*.pt")), weights_only=False)
    groups = ckpt["optimizer"]["param_groups"]
    deltas = [k for k in ckpt["model"] if ".deltas." in k and not k.endswith(("tau_shift", "_extra_state"))]
    assert sum(len(g["params"]) for g in groups) == len(deltas)
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("_thresholds"))
    lrs = sorted(g["lr"] for g in groups if g["name"].endswith("_thresholds"))
    assert lrs and all(lr == pytest.approx(3 * 0.01, rel=1e-12) for lr in lrs)  # --lr 0.01 x --sparse_lr_factor
    assert {"interactions_decay", "products"} <= {g["name"] for g in groups}


def test_stresses_train_the_deltas_through_maces_stress_loss(workdir):
    """MACE's stress loss (--loss stress) trains the deltas through the stresses: the same
    run with --stress_weight 0 and 100 ends with different adapters."""
    d, _ = workdir
    frames = _frames(6, seed=20)
    for atoms in frames:
        atoms.calc = EMT()
        atoms.info["REF_stress"] = atoms.get_stress()
        atoms.calc = None
    write(d / "stress_train.xyz", frames[:4])
    write(d / "stress_valid.xyz", frames[4:])

    def adapter(weight):
        out = _mace_train(d, f"stress{weight}", "--train_file", "stress_train.xyz", "--valid_file", "stress_valid.xyz",
                          "--loss", "stress", "--stress_key", "REF_stress", "--stress_weight", weight,
                          "--sparse_density", "0.05")
        with safe_open(str(out / f"stress{weight}.adapter.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    without, with_ = adapter("0"), adapter("100")
    assert without.keys() == with_.keys()
    assert any(not torch.equal(without[k], with_[k]) for k in without if k.endswith(".values"))


def test_gpu_run_precompiles_on_a_copy_before_training(workdir, monkeypatch):
    """On a GPU, ``tools.train`` starts after MACE's training step and evaluation of the
    first batch ran with launches recorded (here: run for real on the CPU, in place of
    the compile): on a copy, the model and the random state as they were (the loader's
    shuffle draws from it), then MACE's own ``train`` with its arguments untouched."""
    import types

    from sparsekern.integrations.mace.train_hooks import SparseHooks

    _, foundation = workdir
    model = sparsekern.prepare(copy.deepcopy(foundation), sparsekern.SparseConfig(density=0.05), backend="torch")
    atoms = _frames(1)[0]

    class Batch(dict):
        def to(self, device):
            return self

        def to_dict(self):
            return dict(self)

    loader = torch.utils.data.DataLoader([Batch(mace_batch(model, [atoms]))], shuffle=True, collate_fn=lambda b: b[0])
    recorded, trained = [], []

    def fake_precompile(run, workers=None, target=None):
        recorded.append(run())
        return 0

    monkeypatch.setattr("sparsekern.integrations.mace.train_hooks.compiles_kernels", lambda device: True)
    monkeypatch.setattr("sparsekern.ops.triton.precompile.precompile", fake_precompile)
    tools = types.SimpleNamespace(train=lambda **k: trained.append(k))
    run_train = types.SimpleNamespace(configure_model=None, get_params_options=None, deepcopy=None, remove_pt_head=None,
                                      get_swa=None, tools=tools)
    hooks = SparseHooks(sparsekern.SparseConfig(density=0.05), "torch", None)
    hooks.model = model
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    rng = torch.get_rng_state()
    kwargs = dict(model=model, train_loader=loader, device="cpu", rank=0, distributed=False,
                  output_args={"forces": True, "virials": False, "stress": False},
                  loss_fn=lambda pred, ref: pred["energy"].square().sum() + pred["forces"].square().sum())
    with hooks.installed(run_train):
        run_train.tools.train(**kwargs)
    assert run_train.tools.train is tools.train  # restored
    assert len(recorded) == 1 and len(trained) == 1 and trained[0] == kwargs
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if torch.is_tensor(v))
    assert all(p.grad is None for p in model.parameters())


def test_deltas_train_at_the_measured_lr_whatever_maces():
    from sparsekern.cli.mace_train import lr_factor

    assert lr_factor(None, 0.03, 0.01) == pytest.approx(30.0) and lr_factor(None, 0.03, 0.001) == pytest.approx(300.0)
    assert lr_factor(None, 0.005, 0.01) == pytest.approx(100.0) and lr_factor(None, 0.001, 0.01) == pytest.approx(100.0)
    assert 30.0 < lr_factor(None, 0.01, 0.01) < 100.0
    assert lr_factor(3.0, 0.03, 0.01) == 3.0
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=f"--sparse_lr_factor must be finite and > 0, got {bad}"):
            lr_factor(bad, 0.03, 0.01)


def test_lora_runs_mace_own_lora_and_flags_do_not_mix(workdir, capsys):
    d, _ = workdir
    out = _mace_train(d, "lora", "--lora", "True", "--lora_rank", "2")
    assert (out / "lora.model").is_file() and not list(out.glob("*.safetensors"))
    assert b"sparsekern" not in (out / "lora.model").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        cli(["mace-train", "--name", "x", "--train_file", "t.xyz", "--lora", "True", "--sparse_density", "0.1"])
    assert exit_.value.code == 2 and "--sparse_density" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a tile without block mode would change nothing
        cli(["mace-train", "--name", "x", "--train_file", str(d / "train.xyz"), "--foundation_model",
             str(d / "foundation.model"), "--sparse_tile", "4x4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--sparse_tile applies to --sparse_mode block only" in err, err
    with pytest.raises(SystemExit) as exit_:
        cli(["mace-train", "--name", "x", "--train_file", str(d / "nope.xyz"), "--foundation_model",
             str(d / "foundation.model")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"data file not found: --train_file {d / 'nope.xyz'}" in err, err
    for flags, says in ((["--sparse_backend", "cuda"], "--sparse_backend: backend 'cuda' is not available on cpu"),
                        (["--sparse_seed", str(2 ** 70)], "SparseConfig: seed must be in [0, 2**63)")):
        with pytest.raises(SystemExit) as exit_:  # before MACE's set-up (they gave its traceback after it)
            cli(["mace-train", "--name", "x", "--train_file", str(d / "train.xyz"), "--foundation_model",
                 str(d / "foundation.model"), "--device", "cpu", *flags])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    # a density that keeps none of the model's path weights: found once MACE built the model
    run = _run_mace_train(d, "nothing", "--sparse_density", "1e-9")
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and last.startswith("sparsekern mace-train: error: density 1e-09 keeps none of the "
                                                    "model's"), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    with pytest.raises(SystemExit) as exit_:
        cli(["mace-train", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "--foundation_model" in help_text and "--sparse_density" in help_text and "--sparse_tile" in help_text



@pytest.mark.parametrize("device, calls", [("cpu", 1), ("cuda", 0)])
def test_cpu_runs_keep_freed_memory(monkeypatch, device, calls, tmp_path):
    """On the CPU MACE's loop runs with freed memory kept in the process (host_memory)."""
    from mace.cli import run_train

    from sparsekern.cli import mace_train

    kept = []
    monkeypatch.setattr(mace_train, "keep_freed_memory", lambda: kept.append(1))
    monkeypatch.setattr(run_train, "run", lambda args: None)  # the training itself is tested above
    monkeypatch.setattr(mace_train, "_check_foundation_file", lambda parser, spec: None)  # (tested below)
    monkeypatch.setattr(mace_train, "_check_data", lambda parser, args: None)  # (tested below)
    monkeypatch.setattr(mace_train, "usable_device", torch.device)  # (a "cuda" run on this machine)
    (tmp_path / "f.model").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert mace_train.main(["--name", "x", "--train_file", "t.xyz", "--foundation_model", str(tmp_path / "f.model"),
                            "--device", device]) == 0
    assert len(kept) == calls


def test_a_foundation_model_mace_cannot_get_is_one_line(monkeypatch, capsys, tmp_path):
    """A named foundation model MACE cannot download, a model file that is not there, or
    not a model, or another family's: one line each, exit 2, before MACE's set-up; MACE's
    loaders are its own again afterwards."""
    from mace.cli import run_train

    from sparsekern.cli import mace_train

    def offline(**kwargs):
        raise RuntimeError("Model download failed\nand no local model found")

    monkeypatch.setattr(run_train, "mace_mp", offline)
    monkeypatch.chdir(tmp_path)
    write("t.xyz", _frames(1))
    monkeypatch.setattr(run_train, "run", lambda args: run_train.mace_mp(model=args.foundation_model))
    assert mace_train.main(["--name", "x", "--train_file", "t.xyz", "--foundation_model", "medium"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "sparsekern mace-train: error: --foundation_model medium: Model download failed and no local model found "
        "(MACE downloads it the first time: without internet, give a .model file)")
    assert run_train.mace_mp is offline
    Path("text.model").write_text("not a model\n")
    torch.save({"config": {}, "model_state_dict": {}}, "7net.pth")
    for spec, says in ((str(tmp_path / "absent.model"), "absent.model: file not found"),
                       ("meduim", "meduim: neither a file nor a name of MACE's foundation models (small, medium,"),
                       ("text.model", "--foundation_model text.model is not a model file (not a torch.save archive"),
                       ("7net.pth", "--foundation_model 7net.pth holds a sevennet model: mace-train fine-tunes MACE "
                                    "models (`sparsekern finetune --model 7net.pth` fine-tunes this one)")):
        with pytest.raises(SystemExit) as exit_:
            mace_train.main(["--name", "x", "--train_file", "t.xyz", "--foundation_model", spec])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("freeze", [None, 6])
def test_optimizer_groups_hold_deltas_in_their_base_weights_group(workdir, freeze):
    """MACE's groups (get_params_options) for the prepared model: only deltas, each in
    the group of the weight it changes; thresholds without decay; --freeze 6 (all but
    the readouts) leaves no delta on what it froze."""
    from mace.tools.arg_parser import build_default_arg_parser
    from mace.tools.scripts_utils import get_params_options

    from sparsekern.integrations.mace.train_hooks import SparseHooks
    from sparsekern.finetune import calibrate_density, iter_deltas
    from sparsekern.finetune.lr_scale import entry_lr_factors

    _, foundation = workdir
    argv = ["--name", "x", "--train_file", "t.xyz"] + ([] if freeze is None else ["--freeze", str(freeze)])
    args = build_default_arg_parser().parse_args(argv)
    model = copy.deepcopy(foundation)
    hooks = SparseHooks(sparsekern.SparseConfig(density=0.05), "auto", args, lr_factor=lambda lr: 3.0)
    groups = hooks.params_options(get_params_options, args, model)["params"]
    factors = entry_lr_factors(model)

    in_groups = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(in_groups) == len({id(p) for p in in_groups}) == len(trainable)
    assert {id(p) for p in in_groups} == {id(p) for p in trainable}
    group_of = {id(p): g for g in groups for p in g["params"]}
    for name, layer, param, delta in iter_deltas(model):
        assert freeze is None or name.startswith("readouts."), name
        assert group_of[id(delta.log_tau)]["name"].endswith("_thresholds")
        assert group_of[id(delta.log_tau)]["weight_decay"] == 0.0
        expected = "interactions_decay" if name.endswith(".linear") and name.startswith("interactions.") else None
        if expected:
            assert group_of[id(delta.v)]["name"] == expected
        # alone in its group, at MACE's lr x --sparse_lr_factor x the factor of its weight's scale
        assert group_of[id(delta.v)]["params"] == [delta.v]
        assert group_of[id(delta.v)]["lr"] == pytest.approx(args.lr * 3.0 * factors[id(delta.v)][1], rel=1e-12)
        assert group_of[id(delta.log_tau)]["lr"] == pytest.approx(args.lr * 3.0, rel=1e-12)
    assert len({f for _, f in factors.values()}) > 1
    if freeze is None:
        decayed = {g["name"] for g in groups if g["weight_decay"] > 0}
        assert decayed == {"interactions_decay", "products"}
    calibrate_density(model)  # the target density, as after training (prepare starts at zero)
    stats = sparsekern.stats(model)
    changed = {k for k, v in stats["by_layer"].items() if v["changed"]}
    assert changed and (freeze is None or all(k.startswith("readouts.") for k in changed))


def test_one_head_of_a_multi_head_foundation_is_the_saved_base(workdir):
    """MACE keeps one head of a multi-head foundation (``--foundation_head``): the adapter
    applies to that model, saved beside it, not to the file (which it would not load on)."""
    d, _ = workdir
    two_heads = mace_mp0_shaped("small", seed=5, num_elements=2, atomic_numbers=[13, 29],
                                hidden_irreps=o3.Irreps("4x0e+4x1o"), max_ell=1, correlation=2, radial_MLP=[8],
                                r_max=4.0, heads=["pbe", "r2scan"], atomic_energies=[[-3.0, -4.0], [-2.5, -3.5]],
                                atomic_inter_scale=[1.0, 1.0], atomic_inter_shift=[0.0, 0.0])
    torch.save(two_heads, d / "two_heads.model")
    out = _mace_train(d, "head", "--foundation_model", "two_heads.model", "--foundation_head", "r2scan",
                      "--multiheads_finetuning", "False", "--model_dir", "head")  # (relative to the run's folder)
    adapter, base = out / "head.adapter.safetensors", out / "head.base.model"
    with safe_open(str(adapter), framework="pt") as f:
        assert f.metadata()["base_model"] == str(base.resolve())  # (read from the adapter's folder)
    tuned = torch.load(out / "head.model", weights_only=False)
    adapted = sparsekern.load_adapter(torch.load(base, weights_only=False), adapter)
    atoms = _frames(1, seed=41)[0]
    want, got = (m(mace_batch(m, [atoms]), compute_force=True)["energy"] for m in (tuned, adapted))
    assert rel_err(got, want) <= 1e-12


def _lrs(out, name):
    ckpt = torch.load(sorted((out / "checkpoints").glob(f"{name}*.pt"))[-1], weights_only=False)
    return ckpt["optimizer"]["param_groups"]


def test_replay_fine_tuning_trains_the_deltas_at_their_lr(workdir):
    """MACE's replay fine-tuning lowers its lr to 1e-4 inside its script: the deltas still
    train at the measured lr of their density (0.3 at 5 %), not 1e-4 x the factor for 0.01."""
    d, _ = workdir
    out = _mace_train(d, "replay", "--sparse_density", "0.05", "--multiheads_finetuning", "True",
                      "--pt_train_file", "valid.xyz")
    thresholds = [g["lr"] for g in _lrs(out, "replay") if g["name"].endswith("_thresholds")]
    assert thresholds and all(lr == pytest.approx(0.3, rel=1e-12) for lr in thresholds)


def test_stage_two_lowers_every_group_s_lr_as_mace_lowers_its_own(workdir):
    """Stage Two (--swa) takes each group to --swa_lr / --lr times its own lr (one --swa_lr
    for all would drop the deltas' lr 300x); where it never starts (--start_swa at
    --max_num_epochs, MACE saves stage one twice) no Stage Two adapter is written."""
    d, _ = workdir
    out = _mace_train(d, "swa", "--sparse_density", "0.05", "--swa", "--start_swa", "1", "--swa_lr", "0.002",
                      "--max_num_epochs", "2")
    groups = _lrs(out, "swa")
    assert len({g["initial_lr"] for g in groups}) > 1
    for g in groups:
        assert g["swa_lr"] == pytest.approx(g["initial_lr"] * 0.002 / 0.01, rel=1e-12)
    assert (out / "swa_stagetwo.adapter.safetensors").is_file()
    out = _mace_train(d, "noswa", "--swa", "--start_swa", "1")
    assert (out / "noswa.adapter.safetensors").is_file() and not list(out.glob("*stagetwo*"))


def test_refused_before_mace_starts(workdir, capsys):
    """One line, exit 2, before MACE's set-up: sparse options in a --config file beside
    --lora True (they would change nothing), a replay file that is not there, 0 epochs."""
    d, _ = workdir
    (d / "lora.yaml").write_text("lora: True\nsparse_density: 0.005\n")
    common = ["mace-train", "--name", "x", "--train_file", str(d / "train.xyz"), "--foundation_model",
              str(d / "foundation.model")]
    for extra, says in ((["--config", str(d / "lora.yaml")], "the sparse-delta flags ['--sparse_density'] do not "
                                                             "apply"),
                        (["--multiheads_finetuning", "True", "--pt_train_file", str(d / "nope.xyz")],
                         f"data file not found: --pt_train_file {d / 'nope.xyz'}"),
                        (["--max_num_epochs", "0"], "--max_num_epochs must be >= 1, got 0")):
        _refused(cli, [*common, *extra], says, capsys)


def _refused(cli, argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_data_mace_would_train_on_or_fail_late_are_refused_before_it_starts(workdir, capsys, tmp_path):
    """sparsekern's reader on MACE's files, under its keys (NaN labels trained a model of NaN,
    saved with exit code 0); a folder without data, an empty file, an element the foundation
    lacks and a device torch cannot use (tracebacks after MACE's set-up): one line, exit 2."""
    d, _ = workdir
    frames = _frames(3)
    frames[1].info["REF_energy"] = float("nan")
    write(tmp_path / "nan.xyz", frames)
    frames = _frames(3)
    frames[2].numbers[0] = 28
    write(tmp_path / "ni.xyz", frames)
    (tmp_path / "empty.xyz").write_text("")
    (tmp_path / "folder").mkdir()
    common = ["mace-train", "--name", "x", "--foundation_model", str(d / "foundation.model"), "--work_dir",
              str(tmp_path / "work")]
    cases = [(["--train_file", str(tmp_path / "nan.xyz")], "nan.xyz frame 1: energy 'REF_energy' hold NaN"),
             (["--train_file", str(d / "train.xyz"), "--valid_file", str(tmp_path / "nan.xyz")], "nan.xyz frame 1"),
             (["--train_file", str(tmp_path / "folder")], "is a folder without data files MACE reads"),
             (["--train_file", str(tmp_path / "empty.xyz")], "empty.xyz"),
             (["--train_file", str(tmp_path / "ni.xyz")], "ni.xyz holds elements the model does not know: ['Ni']")]
    if not torch.cuda.is_available():
        cases.append((["--train_file", str(d / "train.xyz"), "--device", "cuda"], "--device cuda: this torch"))
    for extra, says in cases:
        _refused(cli, [*common, *extra], says, capsys)
    assert not (tmp_path / "work").exists()


def test_frames_without_some_labels_pass_as_mace_reads_them(workdir, tmp_path):
    """MACE trains frames lacking their energy or forces (that label at weight 0): the
    check before it starts lets them through, and still reads the labels they have."""
    import argparse

    from sparsekern.cli.mace_train import _check_data

    d, _ = workdir
    frames = _frames(3)
    del frames[1].arrays["REF_forces"]
    del frames[2].info["REF_energy"]
    write(tmp_path / "partial.xyz", frames)
    parser = argparse.ArgumentParser()
    args = argparse.Namespace(train_file=str(tmp_path / "partial.xyz"), valid_file=None, test_file=None,
                              pt_train_file=None, pt_valid_file=None, foundation_model=str(d / "foundation.model"),
                              energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress",
                              virials_key="REF_virials")
    _check_data(parser, args)
    frames[0].info["REF_energy"] = float("nan")
    write(tmp_path / "partial.xyz", frames)
    with pytest.raises(SystemExit):
        _check_data(parser, args)
