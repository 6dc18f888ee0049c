"""The fine-tuning harness: one base model, one data set, and a method: ``sparse`` (the
sparse delta), ``full`` (every base weight trainable) or ``lora`` (equivariant LoRA);
the base model's zero-shot errors are always recorded. Every method gets the same
data, epochs, batches (same shuffles), optimizer and loss, so only the method differs.

Loss (MACE's weighted energy-forces loss): energy_weight * mean(((E - E_ref) / N)^2)
+ forces_weight * mean((F - F_ref)^2) (+ stress and magnetic terms). Optimizer: Adam
with amsgrad (MACE's default; ``--no_amsgrad``: plain Adam), constant or cosine
learning rate; MACE's Stage Two (``--stage_two``) switches loss weights and lr for the
last epochs. With validation frames, the result is the epoch of the lowest validation
loss (MACE's rule; ``--last_epoch``: the last), ``--patience`` epochs without a lower one
stop the run; otherwise the model after the last epoch is the result.
Energies get a fixed per-element shift chosen by ``--E0s`` (see ``data.energy_shift``).

Under torchrun, each process computes its share of every global batch and one
all_reduce per step sums the gradients (``distributed``); rank 0 writes. SIGTERM or
SIGINT stops every process at the next step boundary, after a checkpoint that a rerun
resumes mid-epoch (``preemption``)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import resource
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import delta_slot
from ..files import atomic_write, exclusive, names_a_file, output_folder
from ..host_memory import keep_freed_memory
from ..integrations import Family, computing_at, family_for
from ..magnetism.family import magnetic_counts, magnetic_family, parameter_groups, train_magnetic
from ..patching import patch, patched_layers, release
from . import checkpoint
from .adapters import save_adapter
from .averaging import ParameterAverage
from .backward import backward
from .config import SparseConfig
from .curves import plot_curves
from .data import REFIT_E0S, Frame, data_sha256_16, energy_shift, shared_frames, valid_indices
from .density import calibrate_to_schedule, steady
from .distributed import Group, join, leave
from .evaluation import (Sample, batches, check_elements, check_merged, errors, evaluation_size, fits_in_memory,
                         forward, loss, make_samples, map_batches, outputs, residual_loss, residuals, set_shift,
                         unshifted)
from .graphed_step import GraphedSteps, graphed
from .lifecycle import merge, prepare, target_groups, to_fast, unmergeable
from .lr_scale import by_weight_scale
from .magnetic_fit import fit_magnetic_energy
from .methods import METHODS, MODES
from .parity import parity_data, plot_parity
from .precompile import precompile_run
from .preemption import Preempted, deferred
from .settings import Settings
from .splits import Splits, e0s_rule, read_splits, untrained_elements
from .statistics import stats


def _fit_shift(family: Family, model, spec: str, samples: Sequence[Sample], train: Sequence[Frame],
               settings: Settings, group: Group) -> Dict[int, float]:
    """The per-element energy shift ``spec`` (``--E0s``'s rules) chooses from the training
    frames, with ``samples`` (their graphs and current shift) giving the model's energies."""
    zs = sorted({int(z) for f in train for z in f.atoms.numbers})
    model.eval()

    def predict_energies():
        energies = map_batches(lambda batch: forward(family, model, batch, settings.device, False)[0].detach()
                               .cpu().double(), samples, evaluation_size(settings), group)
        return torch.cat(energies).numpy()

    return energy_shift(spec, train, zs, lambda z: family.own_e0s(model, z), predict_energies)


def _refit(family: Family, model, train_s: Sequence[Sample], train: Sequence[Frame], settings: Settings,
           group: Group) -> Dict[int, float]:
    """The correction to a data-derived shift (``--E0s estimated`` / ``average``) that makes
    it follow the trained model: least squares of its remaining training residuals on the
    composition, as ``estimated`` fits it to the zero-shot ones. Deltas that leave the
    model's own per-element energies frozen drift its energy zero by a constant per atom
    (NOTES.md, "The deltas move the energy zero"); this takes it out. Empty for the other
    ``--E0s``."""
    if settings.e0s not in REFIT_E0S:
        return {}
    return _fit_shift(family, model, "estimated", train_s, train, settings, group)


def _corrected(shift: Dict[int, float], correction: Dict[int, float]) -> Dict[int, float]:
    return {z: v + correction.get(z, 0.0) for z, v in shift.items()}


def _apply_method(model, settings: Settings, family: Family, train_s: Sequence[Sample],
                  numbers: Sequence[int]) -> torch.nn.Module:
    """Make trainable what the method trains: deltas of its mode, or the base weights.
    ``numbers``: the training data's atomic numbers (where element-resolved deltas start)."""
    modes = METHODS[settings.method].modes
    if not modes:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    mode = settings.mode if settings.mode in modes else modes[0]
    resolved = dict(elements=tuple(numbers), element_resolved=settings.element_resolved)
    if mode == "lora":
        config = SparseConfig(mode="lora", lora_rank=settings.lora_rank, seed=settings.seed, **resolved)
    else:
        tile = (1, 1) if mode == "str" else (settings.tile, settings.tile)
        steps = -(-len(train_s) // settings.batch_size)  # per epoch
        # the schedule ends where warmup + anneal epochs end (within --epochs: on target after it),
        # the warmup a step at least
        warmup = max(1, round(settings.density_warmup * steps))
        anneal = max(0, round((settings.density_warmup + settings.density_anneal) * steps) - warmup)
        config = SparseConfig(density=settings.density, mode=mode, tile=tile, seed=settings.seed, warmup_steps=warmup,
                              peak_density=settings.density_peak, anneal_steps=anneal, **resolved)
    model.train()  # the saliency pass needs training's forces (with their graph)
    losses = [partial(loss, family, model, batch, settings) for batch in batches(train_s, settings.batch_size)]
    return prepare(model, config, losses=losses if MODES[mode].needs_loss else None)


def _path_weights(model) -> Dict[str, torch.Tensor]:
    """The base path weights (what ``changed_fraction`` counts), by qualified name."""
    return {f"{name}.{param}": layer.get_parameter(param)
            for name, layer in patched_layers(model) for param in target_groups(layer)}


def _changed_fraction(model, base: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Path weights changed: by the deltas, or (full fine-tuning) against ``base``."""
    if delta_slot.has_deltas(model):
        s = stats(model)
        return {"changed": s["changed_params"], "total": s["total_params"]}
    changed = total = 0
    for name, layer in patched_layers(model):
        for param, groups in target_groups(layer).items():
            now = layer.get_parameter(param).detach().reshape(-1)
            diff = now != base[f"{name}.{param}"].reshape(-1)
            for g in groups:
                changed += int(g.view(diff).sum())
                total += g.numel
    return {"changed": changed, "total": total}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


CURVES = "training.png"  # the learning curves, beside metrics.json
PARITY = "parity.png"  # the evaluated set's predictions against its labels, before and after
ADAPTER = "adapter.safetensors"
# the set the final errors are taken on, by its metrics' prefix: the test frames, else the
# validation frames, else the training frames
EVALUATED = {"test": "test set", "valid": "validation set", "train": "training set"}


def _optimizer(model, settings: Settings, by_scale: bool = True) -> torch.optim.Optimizer:
    groups = parameter_groups(model, settings.magnetic_lr)
    if by_scale and settings.method == "sparse":
        groups = by_weight_scale(model, groups, settings.lr)
    optimizer = torch.optim.Adam(groups, lr=settings.lr, amsgrad=settings.amsgrad)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]  # what the schedule scales (saved with the optimizer's state)
    return optimizer


def _stage(settings: Settings, epoch: int) -> Settings:
    """The settings epoch ``epoch`` (from 0) trains and validates with: Stage Two's loss
    weights from --start_stage_two on (a copy; its lr is ``_schedule``'s)."""
    if not _in_stage_two(settings, epoch):
        return settings
    staged = copy.copy(settings)  # (not replace(): the copy is not a new run's Settings to check)
    staged.energy_weight, staged.forces_weight, staged.stress_weight = (
        settings.stage_two_energy_weight, settings.stage_two_forces_weight, settings.stage_two_stress_weight)
    return staged


def _in_stage_two(settings: Settings, epoch: int) -> bool:
    return settings.stage_two and epoch >= settings.start_stage_two


def _schedule(optimizer: torch.optim.Optimizer, settings: Settings, done: int, total: int, epoch: int) -> None:
    """Set each group's lr for the step after ``done`` of ``total``, in epoch ``epoch``: a
    function of the step alone, so a resumed run continues the same curve. Stage Two
    scales every group's by --stage_two_lr / --lr from its first step (MACE's SWALR
    anneals to it over one epoch)."""
    factor = 0.5 * (1 + math.cos(math.pi * done / total)) if settings.lr_schedule == "cosine" else 1.0
    if _stage(settings, epoch) is not settings:
        factor *= settings.stage_two_lr / settings.lr
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


@dataclass
class _Loop:
    """What every training step needs: the model, its optimizer (replaced by ``to_fast``),
    the processes training together, and the signal to stop on (``preemption``)."""

    family: Family
    model: torch.nn.Module
    settings: Settings
    group: Group
    signalled: Callable[[], int]
    save: Callable
    optimizer: Optional[torch.optim.Optimizer] = None  # made by _train
    average: Optional[ParameterAverage] = None  # --ema, made by _train
    graphed: Optional[GraphedSteps] = None  # --cuda_graphs, made by _train

    def trained(self) -> List[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def start_average(self) -> None:
        if self.settings.ema:
            self.average = ParameterAverage(self.trained(), self.settings.ema_decay)

    @contextmanager
    def averaged(self):
        """The model as it is evaluated: with the average (at the scheduled density) under --ema;
        after it, the trained values' thresholds again (``to_fast`` reads them)."""
        if self.average is None:
            yield
            return
        try:
            with self.average.applied():
                calibrate_to_schedule(self.model)
                yield
        finally:
            calibrate_to_schedule(self.model)


def _step(loop: _Loop, batch: List[Sample], epoch: int) -> Tuple[float, int]:
    """One optimizer step on a global batch, of which this process does its share; the
    batch's loss and the signal any process received (0: none)."""
    loop.optimizer.zero_grad(set_to_none=True)
    share = loop.group.share(batch)
    # a rank without a frame in this batch (fewer frames than ranks) runs rank 0's first
    # with weight 0: its gradients add exact zeros, and the model's training-forward
    # hooks (the density controller) run on every rank alike
    mine, weight = (share, 1.0) if share else (batch[:1], 0.0)
    params = loop.trained()
    with fits_in_memory(mine, "a training batch"):  # the backward holds the most
        step_loss = loop.graphed.loss(mine, batch, weight, params) if loop.graphed else None  # None: eager
        if step_loss is None:
            step_loss = loss(loop.family, loop.model, mine, loop.settings, batch) * weight
            backward(step_loss, params)
    total, signum = loop.group.reduce_step(params, float(step_loss.detach()), loop.signalled())
    if not math.isfinite(total):
        kept = "; the last checkpoint is kept" if (Path(loop.settings.out) / checkpoint.CHECKPOINT).exists() else ""
        raise FloatingPointError(f"the loss is {total} in epoch {epoch + 1}: training diverged "
                                 f"(try a lower --lr{kept})")
    loop.optimizer.step()
    if loop.average is not None:
        loop.average.update()
    return total, signum


def _epoch(loop: _Loop, samples: Sequence[Sample], progress: checkpoint.Progress, bar) -> float:
    """The rest of the epoch ``progress`` is in (its steps after ``progress.step``), in
    the order the seed and the epoch give; its mean loss. On a signal, writes the
    checkpoint at this step boundary and raises ``Preempted``."""
    loop.model.train()
    seed = loop.settings.seed * 100003 + progress.epoch
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    steps = -(-len(samples) // loop.settings.batch_size)  # per epoch
    for i, batch in enumerate(batches(samples, loop.settings.batch_size, order)):
        if i < progress.step:
            continue  # done before the run was stopped
        _schedule(loop.optimizer, loop.settings, progress.epoch * steps + i, loop.settings.epochs * steps,
                  progress.epoch)
        step_loss, signum = _step(loop, batch, progress.epoch)
        progress.step += 1
        progress.epoch_loss += step_loss * len(batch)
        bar.update(1)
        bar.set_postfix(epoch=progress.epoch + 1, loss=f"{step_loss:.4g}")
        if signum:
            progress.train_wall_s += time.perf_counter() - t0
            loop.save(loop.model, loop.optimizer, progress, loop.average)
            loop.group.barrier()  # no rank leaves before the checkpoint is on disk
            raise Preempted(signum, f"epoch {progress.epoch + 1}, step {progress.step}")
    progress.train_wall_s += time.perf_counter() - t0
    return progress.epoch_loss / len(samples)


def _patience_spent(progress: checkpoint.Progress, settings: Settings) -> bool:
    """``--patience`` epochs have passed without a lower validation loss (MACE's rule)."""
    return (settings.patience is not None and progress.best is not None
            and progress.epoch - progress.best["epoch"] >= settings.patience)


def _to_train(progress: checkpoint.Progress, settings: Settings) -> bool:
    """Whether another epoch trains. Where --patience runs out before Stage Two, Stage Two
    starts now (MACE's rule): the epochs up to its start are skipped."""
    if settings.stage_two and progress.epoch < settings.start_stage_two and _patience_spent(progress, settings):
        # (an epoch under way, resumed under a lower --patience, is dropped: Stage Two's first is whole)
        progress.epoch, progress.step, progress.epoch_loss, progress.best = settings.start_stage_two, 0, 0.0, None
    return progress.epoch < settings.epochs and not _patience_spent(progress, settings)


def _selected_epoch(progress: checkpoint.Progress, settings: Settings) -> int:
    """The epoch whose model is the result: the lowest validation loss's, or the last."""
    return progress.epoch if settings.last_epoch or progress.best is None else progress.best["epoch"]


def _judge(model, progress: checkpoint.Progress, record: dict) -> None:
    """Keep the evaluated model if its validation loss is the lowest so far. An epoch
    whose density is still on its way to the target (``--density_warmup``, ``--density_anneal``)
    is not a candidate: its model changes more weights than asked for."""
    if steady(model) and (progress.best is None or record["valid_loss"] < progress.best["loss"]):
        progress.best = {"epoch": record["epoch"], "loss": record["valid_loss"], "state": checkpoint.best_state(model)}


def _train(loop: _Loop, train_s: Sequence[Sample], validate: Optional[Callable[[torch.nn.Module, Settings], tuple]],
           ck: Optional[dict]) -> checkpoint.Progress:
    """The epochs (and steps) still to do, each epoch ending in ``validate`` (where there
    are validation frames) and ``loop.save``; then the model is the selected epoch's."""
    from tqdm import tqdm

    settings, model = loop.settings, loop.model
    progress = checkpoint.restore(model, ck) if ck is not None else checkpoint.Progress()
    loop.group.broadcast_state(model)
    if ck is None and settings.epochs > 0:
        fit_magnetic_energy(loop.family, model, train_s, settings, loop.group)  # a no-op without magnetism
    loop.optimizer = _optimizer(model, settings)
    loop.graphed = graphed(loop.family, model, settings)
    if ck is not None:
        if len(ck["optimizer"]["param_groups"]) != len(loop.optimizer.param_groups):
            loop.optimizer = _optimizer(model, settings, by_scale=False)  # saved before the lr by weight scale
        loop.optimizer.load_state_dict(ck["optimizer"])
        for group in loop.optimizer.param_groups:  # a checkpoint from before the schedule: constant
            group.setdefault("base_lr", group["lr"])
    loop.start_average()
    if ck is not None and loop.average is not None:
        loop.average.load_state_dict(ck["average"])
    steps_per_epoch = -(-len(train_s) // settings.batch_size)
    bar = tqdm(total=settings.epochs * steps_per_epoch, initial=progress.epoch * steps_per_epoch + progress.step,
               desc=f"{settings.method} fine-tuning", unit="step", disable=not (settings.progress and loop.group.main))
    if _to_train(progress, settings):
        precompile_run(loop.family, model, list(train_s[:settings.batch_size]), settings, loop.group)
    while _to_train(progress, settings):
        if settings.fast_after is not None and not progress.fast and progress.epoch >= settings.fast_after:
            to_fast(model)  # train only the active entries from here on
            loop.optimizer, progress.fast = _optimizer(model, settings), True
            loop.start_average()  # over the active entries, from where they stand
            progress.best = None  # a model of the other form: the candidates start again
        loop.settings = _stage(settings, progress.epoch)
        if loop.graphed is not None:
            loop.graphed.settings = loop.settings  # (its replays take the loss's weights as inputs)
        if settings.stage_two and (progress.epoch, progress.step) == (settings.start_stage_two, 0):
            progress.best = None  # validation losses of Stage Two's weights from here (MACE resets too)
        train_loss = _epoch(loop, train_s, progress, bar)
        # the last step moved V and tau: put the density back on the schedule (the pre-hook does
        # this before each training forward, but the epoch's result is evaluated)
        calibrate_to_schedule(model)
        progress.epoch, progress.step, progress.epoch_loss = progress.epoch + 1, 0, 0.0
        record = {"epoch": progress.epoch, "train_loss": train_loss}
        if validate is not None:
            with loop.averaged():
                record["valid"], record["valid_loss"] = validate(model, loop.settings)
                _judge(model, progress, record)
        progress.history.append(record)
        progress.peak_rss_mb = max(progress.peak_rss_mb, _peak_rss_mb())
        loop.save(model, loop.optimizer, progress, loop.average)
    bar.close()
    if loop.average is not None:  # from here on (refit, test, export) the model is the average
        loop.average.copy_to_params()
        calibrate_to_schedule(model)
    if _selected_epoch(progress, settings) != progress.epoch:
        checkpoint.load_best(model, progress.best["state"])
    return progress


def _train_deferred(loop_with: Callable[[Callable[[], int]], _Loop], train_s: Sequence[Sample], validate,
                    ck: Optional[dict]) -> checkpoint.Progress:
    """``_train`` with SIGTERM and SIGINT deferred to step boundaries (``loop_with(signalled)``
    its loop). One received after the last step (in the last epoch's validation or checkpoint
    write) stops the run too, not dropped: that epoch's checkpoint is on disk, so a rerun
    goes on from there."""
    with deferred() as signalled:
        loop = loop_with(signalled)
        progress = _train(loop, train_s, validate, ck)
    signum = max(loop.group.gather({loop.group.rank: signalled()}).values())  # (every rank stops alike)
    if signum:
        raise Preempted(signum, f"the end of epoch {progress.epoch}")
    return progress


def _metrics(settings: Settings, family: Family, frames, shift: Dict[int, float], model, progress,
             errors_by_prefix: Dict[str, object], changed: Dict[str, int]) -> dict:
    """metrics.json, up to the adapter and the merged model."""
    train, valid, test, isolated = frames[:4]
    return {
        "model": settings.model, "family": family.name, "method": settings.method,
        **({"isolated_atoms_set_aside": {split: {str(z): e for z, e in atoms.items()}
                                         for split, atoms in isolated.items()}} if isolated else {}),
        "settings": asdict(settings), "identity": settings.identity(),  # (what a rerun in the folder is checked by)
        "n_train": len(train), "n_valid": len(valid), "n_test": len(test),
        "untrained_elements": untrained_elements(train, [*valid, *test]),
        # frames whose errors are not held out: named by the CLI
        "test_frames_in_train": shared_frames(test, train), "valid_frames_in_train": shared_frames(valid, train),
        **({"valid_indices_in_train": valid_indices(len(train) + len(valid), settings.valid_fraction, settings.seed)}
           if settings.valid_fraction is not None else {}),
        "data_sha256_16": data_sha256_16(settings.train, settings.valid, settings.test),
        "e0_shift_ev": {str(z): v for z, v in shift.items()},
        **{f"{prefix}_{k}": v for prefix, e in errors_by_prefix.items() for k, v in e.as_dict().items()},
        "changed_fraction": changed["changed"] / changed["total"],
        "changed_params": changed["changed"], "path_params": changed["total"],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_params": sum(p.numel() for n, p in model.named_parameters() if not delta_slot.is_delta_parameter(n)),
        "epochs": progress.epoch, "wall_s": progress.train_wall_s, "history": progress.history,
        **_selection(progress, settings),
    }


def _selection(progress: checkpoint.Progress, settings: Settings) -> dict:
    """Which epoch's model is the result, and why; whether --patience stopped the run."""
    if progress.best is None:
        return {"selected_epoch": progress.epoch, "selected_by": "last epoch"}
    return {"selected_epoch": _selected_epoch(progress, settings),
            "selected_by": "last epoch" if settings.last_epoch else "lowest validation loss" + (
                " of Stage Two's epochs" if settings.stage_two else ""),
            "best_valid_loss_epoch": progress.best["epoch"], "stopped_by_patience": (progress.epoch < settings.epochs
                                                             and _patience_spent(progress, settings))}


def _save_results(family: Family, model, settings: Settings, shift: Dict[int, float], held_s: Sequence[Sample],
                  held: Sequence[Frame], metrics: dict) -> None:
    """The adapter (methods that train deltas), the merged model and its check (on the
    first frame of the evaluated set: ``held_s``, ``held``); where writing fails, the
    adapter's files go again (a rerun would take a lone adapter for another run's)."""
    try:
        _save_adapter_and_merged(family, model, settings, shift, held_s, held, metrics)
    except BaseException:
        for f in [metrics.get("adapter"), *metrics.get("adapter_beside", [])]:
            if f:
                Path(f).unlink(missing_ok=True)
        raise


def _save_adapter_and_merged(family: Family, model, settings: Settings, shift: Dict[int, float],
                             held_s: Sequence[Sample], held: Sequence[Frame], metrics: dict) -> None:
    out = Path(settings.out)
    if delta_slot.has_deltas(model):
        # the shift the fine-tuned energies need beside the deltas (the merged model holds it)
        e0 = {"e0_shift_ev": json.dumps({str(z): v for z, v in shift.items()})}
        e0.update({"modal": settings.modal} if settings.modal else {})  # (the shift is that fidelity's)
        e0["base_model"] = str(Path(settings.model).resolve()) if names_a_file(settings.model) else settings.model
        metrics["adapter"] = str(save_adapter(model, out / ADAPTER, extra_metadata=e0))
        metrics["adapter_bytes"] = Path(metrics["adapter"]).stat().st_size
        metrics["adapter_beside"] = [str(f) for f in family.save_beside_adapter(model, Path(metrics["adapter"]))]
    unmerged = unmergeable(model)
    if unmerged:  # (element-resolved deltas) the adapter is the result
        metrics.update(merged_model=None, merged_model_skipped=unmerged)
        return
    # the fine-tuned model's own predictions first: the export folds the deltas in place
    reference = [{k: v.detach().cpu().double() for k, v in outputs(family, model, [x], settings.device, False).items()}
                 for x in held_s[:1]]
    merged_path = export_merged(family, model, shift, out / family.merged_filename, settings.model)
    metrics["merged_model"] = str(merged_path)
    metrics["merged_model_check"] = check_merged(family, reference, held[:1], merged_path, settings.device)


def check(settings: Settings) -> Tuple[Family, Splits, Path]:
    """What can be refused before the slow work: the model's family (its package), the
    data (train, valid, test) and the output folder."""
    family = check_model(settings)
    frames = read_splits(settings)
    return family, frames, output_folder(settings.out)


def check_model(settings: Settings) -> Family:
    """The model's family, where it can run here (its package installed) as ``settings`` ask."""
    if names_a_file(settings.model) and not Path(settings.model).exists():
        raise FileNotFoundError(f"--model {settings.model}: file not found")
    family = family_for(settings.model)
    if importlib.util.find_spec(family.package) is None:
        raise ImportError(f"--model {settings.model} is a {family.name} model, but {family.package} is not "
                          f"installed in this environment")
    family = magnetic_family(family, settings)
    if settings.cuda_graphs and not family.pads():
        raise ValueError(f"--cuda_graphs: {family.name} models have no padded training step; leave it out")
    if settings.default_dtype is not None and settings.default_dtype not in family.dtypes:
        raise ValueError(f"--default_dtype {settings.default_dtype}: {family.name} models train in "
                         f"{' or '.join(family.dtypes)}")
    return family


def run(settings: Settings) -> dict:
    """Train and evaluate; write DIR/metrics.json, the adapter, the merged model and a
    resumable checkpoint. Returns the metrics. Under torchrun, each process trains its
    share of every batch and rank 0 writes."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    made = not Path(settings.out).exists()
    group, device = join(settings.device)
    try:
        family, frames, out = group.everywhere(lambda: check(settings))  # (every rank reads them: one says why not)
        made = any(group.gather({group.rank: made}).values())  # (another rank may have made it first)
        if torch.device(device).type == "cpu":
            keep_freed_memory()  # a step's large tensors reused, not faulted in again
        with _held(out, group, made):
            return _run(replace(settings, device=device), out, family, frames, group, started)
    finally:
        leave(group)


@contextmanager
def _held(out: Path, group: Group, made: bool):
    """The output folder held (``exclusive``) by rank 0, the one that reads and writes in
    it, while the block runs; if it is taken, every rank says so. (Removed again if the
    run ``made`` it and fails before writing in it.)"""
    with ExitStack() as stack:
        group.from_main(lambda: stack.enter_context(exclusive(out, made)))
        yield


def _run(settings: Settings, out: Path, family: Family, frames, group: Group, started: float) -> dict:
    """``run`` once its inputs are checked and its output folder is held."""
    train, valid, test = frames[:3]
    ck = group.from_main(lambda: _resumed(out, settings, family))
    model = _load(family, settings)
    family = computing_at(family, model, settings.modal, "--modal/--head")  # (read from the model: loaded once)
    group.from_main(lambda: [check_elements(family, model, group_frames, what) for group_frames, what in (
        (train, settings.train), (test, settings.test), (valid, settings.valid))])  # (said once)
    shift = ({int(z): v for z, v in ck["shift"].items()} if ck is not None else _fit_shift(
        family, model, e0s_rule(settings, frames), make_samples(family, model, train, {}), train, settings, group))
    train_s, test_s, valid_s = (make_samples(family, model, f, shift) for f in (train, test, valid))
    evaluated, held, held_s = _evaluated_set((train, valid, test), (train_s, valid_s, test_s))

    patch(model)
    res, zero_shot, base_valid = _zero_shot(family, model, (evaluated, held_s), valid_s, settings, group)
    base = {k: v.detach().clone() for k, v in _path_weights(model).items()}
    numbers = sorted({int(z) for frame in train for z in frame.atoms.numbers})
    model = train_magnetic(_apply_method(model, settings, family, train_s, numbers))  # the moment head trains fully

    def save(trained, optimizer, progress, average):
        if group.main:
            checkpoint.save(out, settings.identity(), trained, optimizer, progress, shift, average)

    def validate(trained, staged: Settings) -> Tuple[dict, float]:
        """Validation errors and loss (``staged``'s weights) with the energy reference the model
        would be saved with now (its refit), as the test's: without it they carry the drift."""
        set_shift(valid_s, valid, _corrected(shift, _refit(family, trained, train_s, train, settings, group)))
        res = residuals(family, trained, valid_s, settings, group)
        return errors(res).as_dict(), residual_loss(res, staged)

    progress = _train_deferred(lambda signalled: _Loop(family, model, settings, group, signalled, save), train_s,
                               validate if valid_s else None, ck)
    magnetic_fit = fit_magnetic_energy(family, model, train_s, settings, group) if progress.epoch > 0 else None
    refit = _refit(family, model, train_s, train, settings, group)
    shift = _corrected(shift, refit)
    for part, part_frames in ((train_s, train), (test_s, test), (valid_s, valid)):
        set_shift(part, part_frames, shift)
    after = residuals(family, model, held_s, settings, group)
    final_errors = {evaluated: errors(after), **zero_shot}
    metrics = _metrics(settings, family, frames, shift, model, progress, final_errors,
                       _changed_fraction(model, base))
    metrics.update(evaluated_on=evaluated, e0_refit_ev={str(z): v for z, v in refit.items()}, processes=group.size)
    metrics.update(magnetic_counts(model))
    metrics.update(_against_the_base(metrics, base_valid, settings), **_against_zero_shot(metrics, settings))
    if magnetic_fit is not None:  # (again, on the trained base) what the cross-validation chose
        metrics["magnetic_fit"] = magnetic_fit
    if group.main:
        _save_results(family, model, settings, shift, held_s, held, metrics)
        _write_curves(out, metrics)
        title = (f"{settings.method} fine-tuning of {Path(settings.model).name}: the {EVALUATED[evaluated]} "
                 f"({len(held)} frames)")
        atomic_write(out / PARITY, lambda tmp: plot_parity(parity_data(held_s, res, after), title, tmp))
        metrics["files"] = _files(out, family, metrics)
        metrics["command_wall_s"] = time.perf_counter() - started
        metrics["peak_rss_mb"] = max(progress.peak_rss_mb, _peak_rss_mb())
        atomic_write(out / checkpoint.METRICS, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
    group.barrier()
    return metrics


def _write_curves(out: Path, metrics: dict) -> None:
    """The learning curves, where the run has epochs; else none (those there are of a run
    of these arguments whose checkpoint was deleted: not this run's)."""
    if metrics["history"]:
        atomic_write(out / CURVES, lambda tmp: plot_curves(metrics, tmp))
    else:
        (out / CURVES).unlink(missing_ok=True)


def _resumed(out: Path, settings: Settings, family: Family) -> Optional[dict]:
    """The checkpoint this run resumes from; None for a fresh run, which another run's
    results in ``out`` refuse (``checkpoint.check_results``)."""
    ck = checkpoint.load(out, settings)
    if ck is None:
        checkpoint.check_results(out, settings, (checkpoint.METRICS, CURVES, PARITY, ADAPTER, family.merged_filename))
    return ck


def _zero_shot(family: Family, model, held: Tuple[str, Sequence[Sample]], valid_s: Sequence[Sample],
               settings: Settings, group: Group) -> tuple:
    """The base model's residuals on the evaluated set (``held``: its name, its samples),
    their errors and those on the validation frames, and its residuals on the validation
    frames (None without), taken before training moves the latter's energy reference.
    (A resumed run takes them again on the base: it is loaded before the checkpoint.)"""
    evaluated, held_s = held
    res = residuals(family, model, held_s, settings, group)
    zero_shot = {f"zero_shot_{evaluated}": errors(res),
                 f"zero_shot_no_e0_shift_{evaluated}": errors(unshifted(res))}
    valid = res if evaluated == "valid" else residuals(family, model, valid_s, settings, group) if valid_s else None
    if valid is not None:  # what the validation curves are measured against (training.png)
        zero_shot["zero_shot_valid"] = errors(valid)
    return res, zero_shot, valid


def _load(family: Family, settings: Settings):
    """The model to fine-tune, in ``--default_dtype`` where given."""
    model = family.load(settings.model, settings.device)
    return model if settings.default_dtype is None else model.to(getattr(torch, settings.default_dtype))


def _against_the_base(metrics: dict, base_valid: Optional[Dict[str, torch.Tensor]], settings: Settings) -> dict:
    """The base model's validation loss (its residuals ``base_valid``) under the loss
    weights the result was judged with (Stage Two's where it was chosen there), and whether
    the result's is above it: fine-tuning made the model worse there (the CLI warns)."""
    selected = next((h for h in metrics["history"] if h["epoch"] == metrics["selected_epoch"]), {})
    if base_valid is None or "valid_loss" not in selected:
        return {}
    base = residual_loss(base_valid, _stage(settings, selected["epoch"] - 1))
    return {"zero_shot_valid_loss": base, "valid_loss_above_zero_shot": selected["valid_loss"] > base}


# the loss weight (Settings' field) that trains each error of metrics.json
TRAINED_BY = {"energy_mae_mev_per_atom": "energy_weight", "force_mae_mev_per_A": "forces_weight",
              "stress_mae_mev_per_A3": "stress_weight", "magforce_mae_mev_per_muB": "magforces_weight",
              "magmom_mae_muB": "magmom_weight"}
DIVERGED = 10  # a last epoch's mean training loss over this times its stage's first epoch's: diverged


def _against_zero_shot(metrics: dict, settings: Settings) -> dict:
    """Where the run made the model worse, for the CLI's warnings (none without an epoch):
    the evaluated set's errors of the trained terms (a loss weight > 0 in either stage) above
    the base model's, the reported figures both (the fine-tuned energies after the E0 refit,
    the base's with the shift it was evaluated with); and, where the training loss diverged,
    how (``_divergence``). A run without validation frames has no other sign of either."""
    if not metrics["history"]:
        return {}
    e, stages = metrics["evaluated_on"], (settings, _stage(settings, settings.epochs - 1))
    worse = [k for k, weight in TRAINED_BY.items() if any(getattr(s, weight) > 0 for s in stages)
             and {f"{e}_{k}", f"zero_shot_{e}_{k}"} <= metrics.keys()
             and metrics[f"{e}_{k}"] > metrics[f"zero_shot_{e}_{k}"]]
    return {"worse_than_zero_shot": worse, "training_loss_diverged": _divergence(metrics["history"], settings)}


def _divergence(history: List[dict], settings: Settings) -> Optional[str]:
    """Why the training loss diverged: its last epoch's mean above ``DIVERGED`` times that
    of the first epoch of the same loss weights (Stage Two's start changes them: its jump
    is not divergence); None where it did not. (A non-finite loss stops the run: ``_step``.)"""
    last = history[-1]
    first = next(h for h in history if _in_stage_two(settings, h["epoch"] - 1) == _in_stage_two(
        settings, last["epoch"] - 1))
    if last["train_loss"] <= DIVERGED * first["train_loss"]:
        return None
    return (f"epoch {last['epoch']}'s mean training loss ({last['train_loss']:.4g}) is over {DIVERGED}x "
            f"epoch {first['epoch']}'s ({first['train_loss']:.4g})")


def _evaluated_set(frames, samples) -> Tuple[str, List[Frame], List[Sample]]:
    """The set the final errors are taken on, as (its ``EVALUATED`` name, its frames, its
    samples), of the (train, valid, test) ``frames`` and ``samples``."""
    named = reversed(list(zip(("train", "valid", "test"), frames, samples)))  # test first
    return next((name, f, s) for name, f, s in named if f)


def _files(out: Path, family: Family, metrics: dict) -> List[str]:
    """Every file the run wrote in ``out`` (the command's summary names them): the
    metrics, the checkpoint and the learning curves (neither after --epochs 0 in a new
    folder), the evaluated set's parity plot, the adapter and the merged model, each with
    what was written beside it."""
    files = [out / checkpoint.METRICS] + [f for f in (out / checkpoint.CHECKPOINT,) if f.exists()]
    files += ([out / CURVES] if metrics["history"] else []) + [out / PARITY]
    if "adapter" in metrics:
        files += [Path(f) for f in (metrics["adapter"], *metrics["adapter_beside"])]
    if metrics.get("merged_model"):
        files += family.exported_files(Path(metrics["merged_model"]))
    return [str(f) for f in files]


def export_merged(family: Family, model, shift: Dict[int, float], path: Path, spec: str) -> Path:
    """Fold the deltas (and the E0 shift) into ``model`` in place, strip sparsekern off it
    (the family's loader must not need sparsekern) and write it in the family's format,
    on the CPU (MACE's --save_cpu: the file loads on a machine without the GPU it trained
    on). (In place, not on a deepcopy: copying e3nn's fx-compiled modules renames their
    constants, and SevenNet's loader is strict.)"""
    if delta_slot.has_deltas(model):  # (full fine-tuning trained the weights themselves)
        merge(model)
    release(model).eval().cpu()
    return family.export(model, shift, path, spec)
