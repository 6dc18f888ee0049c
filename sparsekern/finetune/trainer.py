"""The fine-tuning harness: one base model, one data set, and a method: ``sparse`` (the
sparse delta), ``full`` (every base weight trainable) or ``lora`` (equivariant LoRA);
the base model's zero-shot errors are always recorded. Every method gets the same
data, epochs, batches (same shuffles), optimizer and loss, so only the method differs.

Loss (MACE's weighted energy-forces loss): energy_weight * mean(((E - E_ref) / N)^2)
+ forces_weight * mean((F - F_ref)^2). Optimizer: Adam with amsgrad (MACE's default),
constant learning rate; the model after the last epoch is the result (a validation
set, if given, is only reported per epoch). Energies get a fixed per-element shift
chosen by ``--E0s`` (see ``data.energy_shift``)."""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..files import atomic_write
from ..patching import patch, patched_layers, unpatch
from .api import calibrate_density, iter_deltas, merge, prepare, stats, target_groups, to_fast
from .config import SparseConfig
from .adapters import save_adapter
from .data import Frame, energy_shift, read_frames
from .delta import FixedDelta
from .families import Family, family_for
from .lora_adapter import save_lora_adapter

METHODS = ("sparse", "full", "lora")
# Adam moves every trainable entry by about lr per step whatever its gradient's scale;
# a delta that changes a few % of the weights, or a rank-4 factor, needs larger moves
# per entry than full fine-tuning makes on all of them. Chosen on a validation split
# (benchmarks/lr_sweep.py; results in benchmarks/results/lr_sweep_*).
DEFAULT_LR = {"full": 3e-3, "lora": 1e-1, "sparse": 1e-1}
CHECKPOINT = "checkpoint.pt"


@dataclass
class Settings:
    """Everything that decides the result. ``epochs``, ``out`` and ``device`` are left
    out of a checkpoint's identity: a rerun with more epochs resumes."""

    model: str
    train: str
    test: str
    method: str
    out: str
    valid: Optional[str] = None
    epochs: int = 10
    density: float = 0.03
    mode: str = "str"
    tile: int = 8
    lora_rank: int = 4
    fast_after: Optional[int] = None
    lr: Optional[float] = None  # None: DEFAULT_LR[method]
    batch_size: int = 4
    seed: int = 0
    energy_weight: float = 1.0
    forces_weight: float = 100.0
    e0s: str = "estimated"
    energy_key: str = "REF_energy"
    forces_key: str = "REF_forces"
    max_train: Optional[int] = None
    max_valid: Optional[int] = None
    max_test: Optional[int] = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0 "
                             f"(got {self.epochs}, {self.batch_size}, {self.lr})")
        if self.fast_after is not None and self.method != "sparse":
            raise ValueError("--fast_after applies to --method sparse only")
        if self.mode not in ("str", "block"):
            raise ValueError(f"--mode must be str or block, got {self.mode!r}")
        if self.tile < 1:
            raise ValueError(f"--tile must be >= 1, got {self.tile}")

    def identity(self) -> Dict[str, object]:
        d = asdict(self)
        for k in ("epochs", "out", "device", "progress"):
            d.pop(k)
        for k in ("train", "valid", "test"):  # the same file wherever the command runs from
            d[k] = str(Path(d[k]).resolve()) if d[k] else None
        if not self.model.startswith("7net") and Path(self.model).exists():
            d["model"] = str(Path(self.model).resolve())
        return d


@dataclass
class Sample:
    graph: object
    energy: float
    forces: torch.Tensor
    natoms: int
    shift: float = 0.0  # the fixed per-element energy shift summed over the frame's atoms


@dataclass
class Errors:
    energy_mae_mev_per_atom: float
    energy_rmse_mev_per_atom: float
    force_mae_mev_per_A: float
    force_rmse_mev_per_A: float


def _batches(samples: Sequence[Sample], size: int, order: Optional[torch.Tensor] = None):
    idx = list(range(len(samples))) if order is None else order.tolist()
    for i in range(0, len(idx), size):
        yield [samples[j] for j in idx[i:i + size]]


def _forward(family: Family, model, batch: List[Sample], device: str, training: bool):
    energy, forces = family.predict(model, family.collate([s.graph for s in batch], device), training)
    shift = torch.tensor([s.shift for s in batch], dtype=energy.dtype, device=energy.device)
    return energy + shift, forces


def _targets(batch: List[Sample], like: torch.Tensor):
    e = torch.tensor([s.energy for s in batch], dtype=like.dtype, device=like.device)
    n = torch.tensor([s.natoms for s in batch], dtype=like.dtype, device=like.device)
    f = torch.cat([s.forces for s in batch]).to(like)
    return e, n, f


def _residuals(family: Family, model, samples: Sequence[Sample], settings: Settings):
    """Per frame (E - E_ref) / N and its energy shift per atom; all force residuals."""
    model.eval()
    de, shift, df = [], [], []
    for batch in _batches(samples, settings.batch_size):
        energy, forces = _forward(family, model, batch, settings.device, training=False)
        e, n, f = _targets(batch, energy)
        de.append(((energy.detach() - e) / n).cpu().double())
        shift.append(torch.tensor([s.shift / s.natoms for s in batch], dtype=torch.float64))
        df.append((forces.detach() - f).cpu().double().reshape(-1))
    return torch.cat(de), torch.cat(shift), torch.cat(df)


def _errors(de: torch.Tensor, df: torch.Tensor) -> Errors:
    return Errors(1e3 * float(de.abs().mean()), 1e3 * float(de.square().mean().sqrt()),
                  1e3 * float(df.abs().mean()), 1e3 * float(df.square().mean().sqrt()))


def evaluate(family: Family, model, samples: Sequence[Sample], settings: Settings) -> Errors:
    de, _, df = _residuals(family, model, samples, settings)
    return _errors(de, df)


def _loss(family, model, batch, settings):
    energy, forces = _forward(family, model, batch, settings.device, training=True)
    e, n, f = _targets(batch, energy)
    return (settings.energy_weight * ((energy - e) / n).square().mean()
            + settings.forces_weight * (forces - f).square().mean())


def _samples(family: Family, model, frames: Sequence[Frame], shift: Dict[int, float]) -> List[Sample]:
    return [Sample(family.graph(model, f.atoms), f.energy, torch.as_tensor(f.forces), len(f.atoms),
                   float(sum(shift[int(z)] for z in f.atoms.numbers))) for f in frames]


def _check_elements(family: Family, model, frames: Sequence[Frame], what: str) -> None:
    known = set(family.numbers(model))
    present = {int(z) for f in frames for z in f.atoms.numbers}
    if not present <= known:
        from ase.data import chemical_symbols

        raise ValueError(f"{what} holds elements the model does not know: "
                         f"{sorted(chemical_symbols[z] for z in present - known)}")


def _apply_method(model, settings: Settings) -> torch.nn.Module:
    if settings.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if settings.method == "lora":
        config = SparseConfig(mode="lora", lora_rank=settings.lora_rank, seed=settings.seed)
    else:
        tile = (1, 1) if settings.mode == "str" else (settings.tile, settings.tile)
        config = SparseConfig(density=settings.density, mode=settings.mode, tile=tile, seed=settings.seed)
    return prepare(model, config)


def _path_weights(model) -> Dict[str, torch.Tensor]:
    """The base path weights (what ``changed_fraction`` counts), by qualified name."""
    return {f"{name}.{param}": layer.get_parameter(param)
            for name, layer in patched_layers(model) for param in target_groups(layer)}


def _changed_fraction(model, settings: Settings, base: Dict[str, torch.Tensor]) -> Dict[str, int]:
    if settings.method != "full":
        s = stats(model)
        return {"changed": s["changed_params"], "total": s["total_params"]}
    changed = total = 0
    layers = dict(patched_layers(model))
    for name, layer in layers.items():
        for param, groups in target_groups(layer).items():
            now = layer.get_parameter(param).detach().reshape(-1)
            diff = now != base[f"{name}.{param}"].reshape(-1)
            for g in groups:
                changed += int(g.view(diff).sum())
                total += g.numel
    return {"changed": changed, "total": total}


def _restore_fast(model, state: dict) -> None:
    """After ``to_fast`` on a fresh model, give each FixedDelta the checkpoint's active
    set (its shape is the checkpoint's, not the fresh model's)."""
    for layer_name, layer, param, delta in iter_deltas(model):
        if isinstance(delta, FixedDelta):
            prefix = f"{layer_name}.deltas.{param.replace('.', '__')}."
            delta.index = state[prefix + "index"].clone()
            delta.values = torch.nn.Parameter(state[prefix + "values"].clone())


def _checkpoint_path(out: Path) -> Path:
    return out / CHECKPOINT


def _load_checkpoint(out: Path, settings: Settings) -> Optional[dict]:
    path = _checkpoint_path(out)
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    mine = settings.identity()
    differ = {k: (ck["identity"].get(k), v) for k, v in mine.items() if ck["identity"].get(k) != v}
    if differ:
        listed = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{path} was written for different arguments ({listed}); "
                         f"use another --out or delete the checkpoint to start over")
    if ck["epoch"] > settings.epochs:
        raise ValueError(f"{path} is already at epoch {ck['epoch']} > --epochs {settings.epochs}")
    return ck


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _fingerprint_files(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p:
            h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def run(settings: Settings) -> dict:
    """Train and evaluate; write DIR/metrics.json, the adapter, the merged model and a
    resumable checkpoint. Returns the metrics."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    ck = _load_checkpoint(out, settings)
    family = family_for(settings.model)
    model = family.load(settings.model, settings.device)

    train = read_frames(settings.train, settings.energy_key, settings.forces_key, settings.max_train)
    test = read_frames(settings.test, settings.energy_key, settings.forces_key, settings.max_test)
    valid = (read_frames(settings.valid, settings.energy_key, settings.forces_key, settings.max_valid)
             if settings.valid else [])
    for frames, what in ((train, settings.train), (test, settings.test), (valid, settings.valid)):
        _check_elements(family, model, frames, what)

    zs = sorted({int(z) for f in train for z in f.atoms.numbers})
    if ck is not None:
        shift = {int(z): v for z, v in ck["shift"].items()}
    else:
        raw = _samples(family, model, train, {z: 0.0 for z in zs})

        def predict_energies():
            energies = []
            for batch in _batches(raw, settings.batch_size):
                energies.append(_forward(family, model, batch, settings.device, False)[0].detach().cpu().double())
            return torch.cat(energies).numpy()

        shift = energy_shift(settings.e0s, train, zs, lambda z: family.own_e0s(model, z), predict_energies)
    missing = {int(z) for f in test + valid for z in f.atoms.numbers} - set(shift)
    if missing:
        raise ValueError(f"test/valid data hold elements absent from the training data: {sorted(missing)} "
                         f"(their energy reference cannot be fitted)")
    train_s, test_s, valid_s = (_samples(family, model, f, shift) for f in (train, test, valid))

    patch(model)
    de, frame_shift, df = _residuals(family, model, test_s, settings)
    zero_shot, zero_shot_raw = _errors(de, df), _errors(de - frame_shift, df)
    base = {k: v.detach().clone() for k, v in _path_weights(model).items()}
    model = _apply_method(model, settings)

    history: List[dict] = []
    epoch, train_wall, peak_rss = 0, 0.0, 0.0
    if ck is not None:
        if ck.get("fast"):
            to_fast(model)
            _restore_fast(model, ck["model"])
        model.load_state_dict(ck["model"])
        # a resumed run reports the time and memory of the epochs it did not redo too
        epoch, train_wall, history, peak_rss = ck["epoch"], ck["train_wall_s"], ck["history"], ck["peak_rss_mb"]

    def make_optimizer():
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=settings.lr, amsgrad=True)

    optimizer = make_optimizer()
    fast = bool(ck and ck.get("fast"))
    if ck is not None:
        optimizer.load_state_dict(ck["optimizer"])

    from tqdm import tqdm

    steps_per_epoch = -(-len(train_s) // settings.batch_size)
    bar = tqdm(total=settings.epochs * steps_per_epoch, initial=epoch * steps_per_epoch,
               desc=f"{settings.method} fine-tuning", unit="step", disable=not settings.progress)
    while epoch < settings.epochs:
        if settings.fast_after is not None and not fast and epoch >= settings.fast_after:
            to_fast(model)  # train only the active entries from here on
            optimizer, fast = make_optimizer(), True
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_s), generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch))
        total = 0.0
        for batch in _batches(train_s, settings.batch_size, order):
            loss = _loss(family, model, batch, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4g}")
        if not fast and settings.method == "sparse":
            # the last step moved V and tau: put the density back on target (the pre-hook
            # does this before each training forward, but the epoch's result is evaluated)
            calibrate_density(model)
        train_wall += time.perf_counter() - t0
        epoch += 1
        record = {"epoch": epoch, "train_loss": total / len(train_s)}
        if valid_s:
            record["valid"] = asdict(evaluate(family, model, valid_s, settings))
        history.append(record)
        peak_rss = max(peak_rss, _peak_rss_mb())
        state = {"identity": settings.identity(), "epoch": epoch, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "fast": fast, "train_wall_s": train_wall,
                 "peak_rss_mb": peak_rss, "history": history, "shift": shift}
        atomic_write(_checkpoint_path(out), lambda tmp: torch.save(state, tmp))
    bar.close()

    test_errors = evaluate(family, model, test_s, settings)
    changed = _changed_fraction(model, settings, base)
    metrics = {
        "model": settings.model, "family": family.name, "method": settings.method,
        "settings": asdict(settings),
        "n_train": len(train), "n_valid": len(valid), "n_test": len(test),
        "data_sha256_16": _fingerprint_files(settings.train, settings.valid, settings.test),
        "e0_shift_ev": {str(z): v for z, v in shift.items()},
        **{f"test_{k}": v for k, v in asdict(test_errors).items()},
        **{f"zero_shot_test_{k}": v for k, v in asdict(zero_shot).items()},
        **{f"zero_shot_no_e0_shift_test_{k}": v for k, v in asdict(zero_shot_raw).items()},
        "changed_fraction": changed["changed"] / changed["total"],
        "changed_params": changed["changed"], "path_params": changed["total"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_params": sum(p.numel() for n, p in model.named_parameters() if ".deltas." not in f".{n}"),
        "epochs": epoch, "wall_s": train_wall, "history": history,
    }
    if settings.method == "sparse":
        metrics["adapter"] = str(save_adapter(model, out / "adapter.safetensors"))
    elif settings.method == "lora":
        metrics["adapter"] = str(save_lora_adapter(model, out / "adapter.safetensors"))
    if "adapter" in metrics:
        metrics["adapter_bytes"] = Path(metrics["adapter"]).stat().st_size
    # the fine-tuned model's own predictions first: the export folds the deltas in place
    reference = [tuple(t.detach().cpu().double() for t in _forward(family, model, [x], settings.device, False))
                 for x in test_s[:1]]
    merged_path = export_merged(family, model, shift, out / family.merged_filename, settings.model)
    metrics["merged_model"] = str(merged_path)
    metrics["merged_model_check"] = check_merged(family, reference, test[:1], merged_path, settings.device)
    metrics["command_wall_s"] = time.perf_counter() - started
    metrics["peak_rss_mb"] = max(peak_rss, _peak_rss_mb())
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
    return metrics


def export_merged(family: Family, model, shift: Dict[int, float], path: Path, spec: str) -> Path:
    """Fold the deltas (and the E0 shift) into ``model`` in place, turn it back into plain
    modules and write it in the family's format. (In place, not on a deepcopy: copying
    e3nn's fx-compiled modules renames their constants, and SevenNet's loader is strict.)"""
    merge(model)
    unpatch(model)  # the merged deltas go with the sparsekern layers
    # nothing of sparsekern may stay in the file: the family's loader must not need it
    model._forward_pre_hooks.clear()  # the density controller
    model.__dict__.pop("sparsekern_config", None)
    model.eval()
    return family.export(model, shift, path, spec)


def check_merged(family: Family, reference, frames: Sequence[Frame], path: Path, device: str) -> dict:
    """The merged file, loaded by the family's own ASE calculator, against the fine-tuned
    model's predictions (``reference``: (energy, forces) per frame): largest energy (eV)
    and force (eV/Å) differences."""
    calc = family.calculator(path, device)
    de = df = 0.0
    for (energy, forces), frame in zip(reference, frames):
        atoms = frame.atoms.copy()
        atoms.calc = calc
        de = max(de, abs(atoms.get_potential_energy() - float(energy[0])))
        df = max(df, float(np.abs(atoms.get_forces() - forces.numpy()).max()))
    return {"frames": len(frames), "max_abs_energy_diff_ev": de, "max_abs_force_diff_ev_per_A": df}
