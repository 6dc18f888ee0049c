"""The trainer's resumable checkpoint (DIR/checkpoint.pt): the model's and optimizer's
state, where training stands (the epoch and the steps done in it: the data order is the
seed's, so a run stopped mid-epoch continues exactly), and the energy shift, for the
arguments that decide the result (``Settings.identity``, which leaves out the number of
processes); a rerun of the same command resumes from it. Written whole or not at all
(``atomic_write``): a kill at any moment leaves the previous one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .. import delta_slot
from ..files import atomic_write
from .delta import FixedDelta
from .lifecycle import to_fast
from .settings import CONTENT

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"  # a run's results: its identity and the files it wrote


@dataclass
class Progress:
    """Where training stands. A resumed run reports the time and memory of the epochs it
    did not redo too."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done in the epoch under way
    epoch_loss: float = 0.0  # its loss so far, summed over frames
    train_wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    fast: bool = False  # training only the active entries (``to_fast``)
    history: List[dict] = field(default_factory=list)
    # the epoch of the lowest validation loss so far: {"epoch", "loss", "state"}, its model's
    # state less the frozen parameters (``best_state``); None without validation
    best: Optional[dict] = None


def _how_to_resume(differ: dict) -> str:
    """How to resume a run whose arguments ``differ`` (name -> (checkpoint's, now)) only
    in a default: one that changed since it started (the moving average, the lr), or
    one that follows --epochs (Stage Two's start)."""
    if "spin_orbit_dm" in differ:
        return " (it was started by an older version, whose --spin_orbit term was another)"
    if "ema" in differ and differ["ema"][0] is None and set(differ) <= {"ema", "ema_decay", "lr"}:
        return " (a run started before the moving average was the default resumes with --no_ema)"
    for name in ("lr", "start_stage_two"):
        if set(differ) == {name} and differ[name][0] is not None:
            return f" (to resume it, pass --{name} {differ[name][0]:g})"
    return ""


def _difference(name: str, theirs, now, settings, source: str) -> str:
    """One difference of ``source``'s (a checkpoint's, metrics.json's) identity from this
    run's, as the refusal lists it."""
    if name.endswith(CONTENT) and theirs is not None and now is not None:  # (the same file, edited)
        split = name.removesuffix(CONTENT)
        return f"{split}: the file {getattr(settings, split)} changed since (content sha256 {theirs} vs now {now})"
    return f"{name}: {source} {theirs!r} vs now {now!r}"


def _listed(differ: dict, settings, source: str) -> str:
    return ", ".join(_difference(k, a, b, settings, source) for k, (a, b) in differ.items())


def load(out: Path, settings) -> Optional[dict]:
    """The checkpoint in ``out``, if any, checked against ``settings`` (the trainer's)."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    if not isinstance(ck, dict) or not {"identity", "epoch"} <= set(ck):
        raise ValueError(f"{path} is not a sparsekern checkpoint; delete it or use another --out")
    differ = settings.differences(ck["identity"])
    if differ:
        raise ValueError(f"{path} was written for different arguments ({_listed(differ, settings, 'checkpoint')}); "
                         f"use another --out or delete the checkpoint (and the run's results beside it) to start "
                         f"over{_how_to_resume(differ)}")
    step = ck.get("step", 0)
    if ck["epoch"] + (step > 0) > settings.epochs:
        where = f"epoch {ck['epoch'] + 1}, step {step}" if step else f"epoch {ck['epoch']}"
        raise ValueError(f"{path} is already at {where}, beyond --epochs {settings.epochs}")
    return ck


def check_results(out: Path, settings, names: Sequence[str]) -> None:
    """A fresh run (no checkpoint in ``out``) where a run's results are (``names``, and the
    files its metrics.json lists): the rerun of that run's command rewrites them; another
    command is refused, rather than leave that run's files beside its own as if they were
    its own, or overwrite them."""
    try:
        metrics = json.loads((out / METRICS).read_text())
    except (OSError, ValueError):  # (none, or not a run's)
        metrics = {}
    metrics = metrics if isinstance(metrics, dict) else {}
    listed = {Path(f).name for f in metrics.get("files", ()) if isinstance(f, str)}
    present = sorted(n for n in {*names, *listed} if (out / n).is_file())
    identity = metrics.get("identity")
    differ = settings.differences(identity) if isinstance(identity, dict) else None
    if not present or differ == {}:
        return
    why = f"written for different arguments: {_listed(differ, settings, METRICS)}" if differ else "arguments unknown"
    raise ValueError(f"output folder {out} holds another run's results ({', '.join(present)}; {why}) and no "
                     f"checkpoint to resume from: use another --out or delete them to start over")


def save(out: Path, identity: dict, model, optimizer, progress: Progress, shift: dict, average=None) -> None:
    """``model`` holds the trained parameters; ``average`` (--ema), their moving average."""
    state = {"identity": identity, "epoch": progress.epoch, "step": progress.step,
             "epoch_loss": progress.epoch_loss, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "fast": progress.fast, "train_wall_s": progress.train_wall_s,
             "peak_rss_mb": progress.peak_rss_mb, "history": progress.history, "shift": shift,
             "best": progress.best}
    if average is not None:
        state["average"] = average.state_dict()
    atomic_write(out / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def restore(model, ck: dict) -> Progress:
    """Put the checkpoint's state into the freshly prepared ``model`` (the optimizer's
    is restored once it is built)."""
    if ck.get("fast"):
        to_fast(model)
        _restore_fast(model, ck["model"])
    model.load_state_dict(ck["model"])
    return Progress(ck["epoch"], ck.get("step", 0), ck.get("epoch_loss", 0.0), ck["train_wall_s"],
                    ck["peak_rss_mb"], bool(ck.get("fast")), ck["history"], ck.get("best"))


def best_state(model) -> Dict[str, torch.Tensor]:
    """What ``model`` holds besides its frozen parameters (the trained ones, buffers and
    extra state), on the host: enough to return to it after more training."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
            for k, v in model.state_dict().items() if k not in frozen}


def load_best(model, state: Dict[str, torch.Tensor]) -> None:
    """Return ``model`` to a ``best_state`` of it (every key of ``state`` must be its own)."""
    model.load_state_dict({**model.state_dict(), **state})


def _restore_fast(model, state: dict) -> None:
    """After ``to_fast`` on a fresh model, give each FixedDelta the checkpoint's active
    set (its shape is the checkpoint's, not the fresh model's)."""
    for layer_name, _, param, delta in delta_slot.iter_deltas(model):
        if isinstance(delta, FixedDelta):
            prefix = delta_slot.state_prefix(layer_name, param)
            delta.index = state[prefix + "index"].clone()
            delta.values = torch.nn.Parameter(state[prefix + "values"].clone())
