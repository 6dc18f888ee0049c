"""``sparsekern mace-train``: MACE's own training script (``mace_run_train`` of
mace-torch 0.3.16, every flag of it) where only sparse deltas train; how they get in
is ``sparsekern.integrations.mace.train_hooks``. With ``--lora True`` MACE's own LoRA
runs and nothing of sparsekern is applied."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import List, Optional

from ..files import names_a_file
from ..finetune import SparseConfig, stats
from ..finetune.methods import MODES, SPARSE_MODES, choices_help, default_lr
from ..finetune.settings import usable_device
from ..host_memory import keep_freed_memory
from ..integrations.mace.train_hooks import Refused, SparseHooks
from ..ops import registry

SPARSE_PREFIX = "--sparse_"
# The deltas' lr by density under MACE's training script: best of x3, x10, x30, x100 MACE's
# --lr 0.01 on a small MACE tuned on aspirin (benchmarks/mace_finetune.py, two seeds; NOTES.md)
MACE_SPARSE_LR_AT = ((0.005, 1.0), (0.03, 0.3))


def _tile(text: str):
    if text == "path":
        return "path"
    try:
        rows, cols = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile must be ROWSxCOLS (e.g. 8x8) or 'path', got {text!r}") from None
    return (rows, cols)


def build_parser() -> argparse.ArgumentParser:
    from mace import tools
    from mace.tools.arg_parser import str2bool

    parser = tools.build_default_arg_parser()
    parser.prog = "sparsekern mace-train"
    # usage errors in one line, as the other commands' (not MACE's whole usage first)
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    parser.description = ("MACE's mace_run_train with sparsity-promoting fine-tuning: the foundation model's "
                          "weights stay frozen and a sparse delta (a few % of the path weights) trains. Saves a "
                          "plain MACE .model (delta merged) and <name>.adapter.safetensors.")
    group = parser.add_argument_group("sparsekern (sparse delta; ignored with --lora True)")
    group.add_argument("--sparse_density", type=float, default=0.03,
                       help="fraction of the path weights that change")
    modes = [m for m in SPARSE_MODES if not MODES[m].needs_loss]  # MACE's loop prepares before any loss exists
    group.add_argument("--sparse_mode", choices=modes, default="str", help=choices_help(MODES, modes))
    group.add_argument("--sparse_tile", type=_tile, default="8x8",
                       help="block mode: tile as ROWSxCOLS or 'path' for whole path matrices")
    group.add_argument("--sparse_init_scale", type=float, default=1e-3,
                       help="std of the initial delta relative to the base weights' std")
    group.add_argument("--sparse_lr_factor", type=float, default=None,
                       help="multiplies MACE's learning rate (with its per-module factors) for the deltas; "
                            "default: the deltas train at " + ", ".join(f"{lr:g} at density {d:g}"
                                                                       for d, lr in MACE_SPARSE_LR_AT)
                            + " (log-interpolated between) whatever --lr is: Adam moves each entry by about lr "
                              "per step, and a delta that changes a few %% of the weights needs larger moves "
                              "than full fine-tuning (benchmarks/mace_finetune.py)")
    group.add_argument("--sparse_include_radial", type=str2bool, default=True,
                       help="also put deltas on the radial MLPs that make the conv weights")
    group.add_argument("--sparse_backend", choices=registry.CHOICES, default="auto",
                       help="sparsekern kernel back end")
    group.add_argument("--sparse_seed", type=int, default=None, help="seed of the delta's start (None: MACE's --seed)")
    return parser


def _default(parser: argparse.ArgumentParser, dest: str):
    """An option's default as parsed (argparse converts a default given as text)."""
    action = next(a for a in parser._actions if a.dest == dest)
    return action.type(action.default) if isinstance(action.default, str) and action.type else action.default


def _sparse_config(ours: dict, seed: int) -> SparseConfig:
    return SparseConfig(density=ours["sparse_density"], mode=ours["sparse_mode"], tile=ours["sparse_tile"],
                        init_scale=ours["sparse_init_scale"], include_radial=ours["sparse_include_radial"],
                        seed=seed if ours["sparse_seed"] is None else ours["sparse_seed"])


def lr_factor(given: Optional[float], density: float, mace_lr: float) -> float:
    """What MACE's lr is multiplied by for the deltas: ``given``, or so that they train at
    the measured lr for their density (MACE_SPARSE_LR_AT)."""
    if given is None:
        return default_lr("sparse", density, MACE_SPARSE_LR_AT) / mace_lr
    if not (given > 0 and math.isfinite(given)):
        raise ValueError(f"--sparse_lr_factor must be finite and > 0, got {given}")
    return given


class FoundationUnavailable(Exception):
    """MACE could not get the foundation model it was named (offline, an unknown name)."""


@contextmanager
def _foundation_errors(run_train, spec: str):
    """MACE's loaders of named foundation models, their failure turned into one line."""
    saved = {n: getattr(run_train, n) for n in ("mace_mp", "mace_off", "mace_omol", "mace_polar")
             if hasattr(run_train, n)}

    def guarded(load):
        def loaded(*args, **kwargs):
            try:
                return load(*args, **kwargs)
            except Exception as exc:
                raise FoundationUnavailable(f"--foundation_model {spec}: {' '.join(str(exc).split())} (MACE "
                                            f"downloads it the first time: without internet, give a .model file)"
                                            ) from exc
        return loaded

    for name, load in saved.items():
        setattr(run_train, name, guarded(load))
    try:
        yield
    finally:
        for name, load in saved.items():
            setattr(run_train, name, load)


def _check_foundation_name(parser: argparse.ArgumentParser, spec: str, run_train) -> None:
    """A --foundation_model that is not a file must be a name MACE's script downloads
    (else it would torch.load the name and fail with a traceback)."""
    if names_a_file(spec):
        parser.error(f"--foundation_model {spec}: file not found")
    names = [n for n in run_train.mace_mp_names if n] + list(run_train.polar_model_names) + [
        "small_off", "medium_off", "large_off", "mace_omol"]
    if spec not in names:
        parser.error(f"--foundation_model {spec}: neither a file nor a name of MACE's foundation models "
                     f"({', '.join(names)})")


def _check_foundation_file(parser: argparse.ArgumentParser, spec: str) -> None:
    """A --foundation_model file must hold a MACE model (else MACE's unpickling, or its
    use of what it unpickled, fails with a traceback after its set-up)."""
    from ..integrations import family_for

    try:
        family = family_for(spec, "--foundation_model")
    except ValueError as exc:
        parser.error(str(exc))
    if family.name != "mace":
        parser.error(f"--foundation_model {spec} holds a {family.name} model: mace-train fine-tunes MACE models "
                     f"(`sparsekern finetune --model {spec}` fine-tunes this one)")


# --pt_train_file's names of the replay data MACE downloads
_PT_DATA = ("mp", "omat", "matpes_pbe", "matpes_r2scan")
# what MACE reads other than extended XYZ: these files, or a folder of them (scripts_utils.check_path_ase_read)
_MACE_BINARY_DATA = (".h5", ".hdf5", ".lmdb", ".aselmdb", ".mdb")


def _check_data(parser: argparse.ArgumentParser, args) -> None:
    """The data files are there (MACE's reader would raise a traceback, after its set-up),
    and the extended-XYZ ones pass sparsekern's reader (labels under MACE's keys finite and
    within physical bounds, atoms apart, elements the foundation model has): MACE would
    train a model of NaN on them, or fail after its set-up."""
    files = {flag: getattr(args, flag) for flag in ("train_file", "valid_file", "test_file", "pt_train_file",
                                                    "pt_valid_file")}
    if files["pt_train_file"] in _PT_DATA:
        del files["pt_train_file"]
    missing = [f"--{flag} {path}" for flag, path in files.items() if path and not Path(path).exists()]
    if missing:
        parser.error(f"data file not found: {', '.join(missing)}")
    foundation = _foundation_elements(args.foundation_model)
    for flag in ("train_file", "valid_file", "test_file"):
        try:
            _check_file(f"--{flag}", files[flag], args, foundation)
        except (OSError, KeyError, ValueError) as exc:
            parser.error(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc))


def _foundation_elements(spec: Optional[str]):
    """(family, model) of a --foundation_model file, whose elements the data must hold
    (MACE 0.3.16 has no option to add elements to a foundation); None for a name MACE
    downloads (its elements are known once it has)."""
    if not spec or not Path(spec).is_file():
        return None
    from ..integrations import family_for

    family = family_for(spec, "--foundation_model")
    return family, family.load(spec, "cpu")


def _check_file(flag: str, path: Optional[str], args, foundation) -> None:
    """One data file MACE is given (``flag``), as ``_check_data`` says."""
    from ..finetune.data import read_frames
    from ..finetune.evaluation import check_elements

    if not path:
        return
    if Path(path).is_dir():
        if not any(f.suffix in _MACE_BINARY_DATA for f in Path(path).iterdir()):
            raise ValueError(f"{flag} {path} is a folder without data files MACE reads "
                             f"({', '.join('*' + s for s in _MACE_BINARY_DATA)})")
        return
    if Path(path).suffix in _MACE_BINARY_DATA:
        return
    frames = read_frames(path, args.energy_key, args.forces_key, stress_key=args.stress_key,
                         virials_key=args.virials_key, isolated={}, partial=True)  # (as MACE reads them)
    if foundation is not None:
        check_elements(*foundation, frames, f"{flag} {path}")


def _run(run_train, args, hooks: Optional[SparseHooks]) -> int:
    """MACE's training script on ``args`` (with ``hooks`` installed, if any)."""
    try:
        with _foundation_errors(run_train, args.foundation_model):
            if hooks is None:
                run_train.run(args)
                return 0
            with hooks.installed(run_train):
                run_train.run(args)
    except (FoundationUnavailable, Refused) as exc:
        print(f"sparsekern mace-train: error: {exc}", file=sys.stderr)
        return 2
    if hooks.exports:
        s = stats(hooks.model)
        logging.info(f"sparsekern: {s['changed_params']} of {s['total_params']} path weights changed "
                     f"({100 * s['density']:.2f} %); plain MACE model and adapter in {args.model_dir}")
    return 0


def _check_processes(parser: argparse.ArgumentParser, args) -> None:
    """MACE's data-parallel mode: on GPUs only, and asked for where torchrun started several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.distributed:
        parser.error(f"started as one of {os.environ['WORLD_SIZE']} processes (torchrun) without --distributed: each "
                     f"would train the whole run into the same files; add --distributed --launcher torchrun "
                     f"(GPUs), or on CPUs use `sparsekern finetune --nproc N`")
    if args.distributed and args.device not in ("cuda", "xpu"):
        parser.error(f"--distributed: MACE's data-parallel mode runs on GPUs only (--device cuda: NCCL, one process "
                     f"per GPU), not --device {args.device}; on CPUs use `sparsekern finetune --nproc N`")


def main(argv: Optional[List[str]] = None) -> int:
    import mace  # noqa: F401  (also lets e3nn 0.4.4 import under torch >= 2.6)
    from mace.cli import run_train

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    ours = {k: v for k, v in vars(args).items() if k.startswith("sparse_")}
    for key in ours:
        delattr(args, key)  # MACE's code sees its own arguments only
    # given on the command line, or in a --config file (where only a value other than the default tells)
    given = sorted({a.split("=")[0] for a in argv if a.startswith(SPARSE_PREFIX)}
                   | {f"--{k}" for k, v in ours.items() if v != _default(parser, k)})
    _check_processes(parser, args)
    if args.foundation_model and not Path(args.foundation_model).is_file():
        _check_foundation_name(parser, args.foundation_model, run_train)
    elif args.foundation_model:
        _check_foundation_file(parser, args.foundation_model)
    try:
        device = usable_device(args.device)  # (Settings' check: MACE's would fail after its set-up)
    except ValueError as exc:
        parser.error(str(exc))
    if args.lora:
        if given:
            parser.error(f"--lora True runs MACE's LoRA; the sparse-delta flags {given} do not apply with it")
        _check_data(parser, args)
        return _run(run_train, args, None)
    if args.foundation_model is None:
        parser.error("sparse deltas fine-tune a pretrained model: give --foundation_model "
                     "(to train from scratch, use mace_run_train)")
    if args.enable_cueq or args.only_cueq or args.enable_oeq:
        parser.error("--enable_cueq/--only_cueq/--enable_oeq convert the model to other kernels; sparsekern "
                     "replaces the same layers with its own (see --sparse_backend)")
    if ours["sparse_mode"] != "block" and ours["sparse_tile"] != _default(parser, "sparse_tile"):
        parser.error("--sparse_tile applies to --sparse_mode block only: leave it out")  # else it changes nothing
    try:
        config = _sparse_config(ours, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_num_epochs < 1:  # (MACE's script fails after its set-up, saving no model)
        parser.error(f"--max_num_epochs must be >= 1, got {args.max_num_epochs}")
    # MACE's lr as its script sets it (replay fine-tuning lowers it), given when its options are built
    factor = partial(lr_factor, ours["sparse_lr_factor"], config.density)
    try:
        factor(args.lr)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        registry.check(ours["sparse_backend"], device)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"--sparse_backend: {exc}")
    _check_data(parser, args)
    hooks = SparseHooks(config, ours["sparse_backend"], args, factor)
    if args.device == "cpu":
        keep_freed_memory()
    return _run(run_train, args, hooks)
