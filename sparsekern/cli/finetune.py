"""``sparsekern finetune``: fine-tune a foundation model (sparse delta, full, LoRA) on
an extended-XYZ data set and evaluate it; see sparsekern.finetune.trainer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (None, switches)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    from ..finetune.methods import METHODS, choices_help
    from . import OneLineErrors

    p = OneLineErrors(
        prog="sparsekern finetune", formatter_class=_DefaultsShown,
        allow_abbrev=False,  # (MACE's --lora is refused as such, not read as --lora_rank)
        description="Fine-tune a foundation model and evaluate it. Writes DIR/metrics.json, DIR/checkpoint.pt "
                    "(rerunning the same command resumes), the adapter (sparse, lora) and a merged model for "
                    "the family's own ASE calculator.")
    p.add_argument("--config", help="a YAML file of this command's options, MACE's --config: each key an option's "
                                    "name without dashes (`train_file: data.xyz`, `swa: true`); the command line's "
                                    "options win")
    # MACE's names (--foundation_model, --train_file, ...) are accepted beside ours
    p.add_argument("--model", "--foundation_model", required=True,
                   help="7net-0 (or another SevenNet name or .pth), a MACE .model file or a mace_mp name (medium, "
                        "...): names are downloaded the first time")
    p.add_argument("--modal", "--head", help="the fidelity your labels are, for a model of several: a multi-fidelity "
                                             "SevenNet's modality (SevenNetCalculator(modal=...): PBE or R2SCAN for "
                                             "7net-mf-0), a multi-head MACE's head (MACECalculator(head=...))")
    p.add_argument("--train", "--train_file", required=True, help="training frames (extended XYZ)")
    _validation_flags(p)
    p.add_argument("--test", "--test_file", help="test frames (without: the final errors and parity.png are the "
                                                 "validation frames', else the training frames')")
    p.add_argument("--method", required=True, choices=tuple(METHODS), help=choices_help(METHODS))
    p.add_argument("--out", "--name", required=True, help="output directory (MACE's --name: the run's files in a "
                                                           "folder of that name)")
    p.add_argument("--epochs", "--max_num_epochs", type=int, default=10,
                   help="passes over the training frames (0: evaluate only)")
    _delta_flags(p)
    _optimizer_flags(p)
    _stage_two_flags(p)
    p.add_argument("--batch_size", type=int, default=4, help="frames per optimizer step")
    p.add_argument("--valid_batch_size", type=int,
                   help="frames per evaluation batch (validation, test, the E0 and magnetic fits' predictions; "
                        "default --batch_size): memory only, the errors do not depend on it")
    p.add_argument("--seed", type=int, default=0, help="seeds the delta's start and the data order")
    _loss_flags(p)
    p.add_argument("--E0s", dest="e0s", default="estimated",
                   help="foundation | estimated (least squares of the training residuals) | average | "
                        "a dict '{Z: E0}' or a .json file (MACE's meanings) | isolated (the energies of the "
                        "training file's IsolatedAtom frames, MACE's choice where it has them); estimated and "
                        "average are refitted to the trained model's training residuals after training")
    _label_flags(p)
    _magnetic_flags(p)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--default_dtype", choices=("float32", "float64"),
                   help="train and save the model in this dtype (MACE's option; its training default is float64, "
                        "mace_mp's models are float32); default the model's own")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="replay each training step's forward and backward from a CUDA graph (MACE, SevenNet; --device cuda): "
                        "batches padded to a few shapes, the host's per-step work gone")
    p.add_argument("--nproc", type=int, default=1,
                   help="train in N processes on this machine (torchrun's launcher; gloo on CPU, NCCL on GPUs, "
                        "one GPU each); --batch_size stays the global batch, so the result is one process's. "
                        "For several machines, run `torchrun ... -m sparsekern finetune` instead")
    return p


def _true(text: str) -> bool:
    """MACE's spelling of a switch with a value (``--keep_isolated_atoms True``)."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text.lower() == "true"


def _label_flags(p: argparse.ArgumentParser) -> None:
    """Where the frames' labels are, and which frames are read."""
    p.add_argument("--energy_key", default="REF_energy", help="energy label in the frames' info (eV)")
    p.add_argument("--forces_key", default="REF_forces", help="force label in the frames' arrays (eV/Å)")
    p.add_argument("--stress_key", help="with --stress_weight: the stress label in the frames' info (eV/Å^3, "
                                         "ASE's sign; Voigt 6 or 9 values); default REF_stress")
    p.add_argument("--virials_key", help="with --stress_weight: MACE's virials W in the frames' info (eV; Voigt 6 "
                                          "or 9 values), trained as the stress -W/V where a frame has no stress "
                                          "label; default REF_virials")
    p.add_argument("--keep_isolated_atoms", nargs="?", const=True, default=False, type=_true,
                   help="train on MACE's isolated-atom frames too (one atom, config_type IsolatedAtom), which "
                        "are otherwise set aside, from the training file as MACE does, from validation and test "
                        "files too (MACE evaluates those); their energies are listed in metrics.json")
    p.add_argument("--max_train", type=int,
                   help="use the first N training frames (isolated atoms set aside not counted)")
    p.add_argument("--max_valid", type=int, help="use the first N validation frames")
    p.add_argument("--max_test", type=int, help="use the first N test frames")


def _validation_flags(p: argparse.ArgumentParser) -> None:
    """The validation frames, and what their loss decides: the result, the stop."""
    p.add_argument("--valid", "--valid_file", help="validation frames: their errors and loss are reported per epoch, "
                                                   "and the epoch of the lowest loss is the result (MACE's rule)")
    p.add_argument("--valid_fraction", type=float,
                   help="instead of --valid: hold out this fraction of the training frames (after --max_train) "
                        "for validation, the frames MACE's --valid_fraction holds out with the same --seed "
                        "(metrics.json lists them)")
    p.add_argument("--patience", type=int,
                   help="stop after this many epochs without a lower validation loss (MACE's --patience)")
    p.add_argument("--last_epoch", action="store_true",
                   help="the last epoch's model is the result, not the lowest validation loss's")


def _stage_two_flags(p: argparse.ArgumentParser) -> None:
    """MACE's Stage Two (its --swa, whose names are accepted too)."""
    p.add_argument("--stage_two", "--swa", action="store_true",
                   help="MACE's Stage Two: from --start_stage_two on, train with its loss weights and lr, and "
                        "select the result among its epochs")
    p.add_argument("--start_stage_two", "--start_swa", type=int,
                   help="epochs before Stage Two (default 3/4 of --epochs, MACE's)")
    p.add_argument("--stage_two_energy_weight", "--swa_energy_weight", type=float,
                   help="Stage Two's energy weight (default 1000)")
    p.add_argument("--stage_two_forces_weight", "--swa_forces_weight", type=float,
                   help="Stage Two's forces weight (default 100)")
    p.add_argument("--stage_two_stress_weight", "--swa_stress_weight", type=float,
                   help="Stage Two's stress weight (default 10 with --stress_weight)")
    p.add_argument("--stage_two_lr", "--swa_lr", type=float,
                   help="Stage Two's learning rate (default --lr / 10, MACE's ratio); every parameter group's "
                        "lr is scaled by it over --lr")


def _magnetic_flags(p: argparse.ArgumentParser) -> None:
    """Moments in, magnetic labels and the magnetic energy's options (sparsekern.magnetism)."""
    p.add_argument("--magmom_key", help="magnetism: per-atom moments in the frames' arrays (μB; collinear scalars "
                   "or 3-vectors); adds a magnetic energy E(R, m) beside the model, zero at the start")
    p.add_argument("--magforces_key", help="magnetism: magnetic-force labels -dE/dm (eV/μB) in the frames' arrays "
                   "(3-vectors, or collinear scalars: the component along collinear moments)")
    p.add_argument("--predict_magmom", action="store_true", help="magnetism: train a head for moment magnitudes")
    p.add_argument("--spin_orbit", action="store_true",
                   help="magnetism: spin-orbit coupling, the magnetic energy's anisotropic pair terms "
                        "(Dzyaloshinskii-Moriya, pseudo-dipolar) that couple the moments to the lattice; without it "
                        "the energy is invariant under a rotation of the moments alone")
    p.add_argument("--magforces_weight", type=float, default=100.0, help="weight of the magnetic-force error")
    p.add_argument("--magmom_weight", type=float, default=1.0, help="weight of the moment-magnitude error")
    p.add_argument("--magnetic_lr", type=float, default=1e-2,
                   help="magnetism: Adam's learning rate of the moment head (the magnetic energy is fitted "
                        "in closed form at the start and the end)")


def _optimizer_flags(p: argparse.ArgumentParser) -> None:
    """Adam's learning rate, its schedule and the parameters' moving average."""
    from ..finetune.methods import METHODS, SPARSE_LR_AT
    from ..finetune.settings import LR_SCHEDULES

    p.add_argument("--lr", type=float,
                   help="Adam's learning rate (default per method: "
                        + ", ".join(f"{name} {m.lr:g}" for name, m in METHODS.items() if name != "sparse")
                        + ", chosen on a validation split by benchmarks/lr_sweep.py; sparse by density: "
                        + ", ".join(f"{lr:g} at {d:g}" for d, lr in SPARSE_LR_AT[True]) + " ("
                        + ", ".join(f"{lr:g}" for _, lr in SPARSE_LR_AT[False])
                        + " with --no_ema), held beyond, log-interpolated between)")
    p.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant",
                   help="constant, or cosine: the learning rate decays to 0 over the run's steps")
    p.add_argument("--ema", action="store_true", default=True,
                   help="validate, test and save an exponential moving average of the trained parameters "
                        "(MACE's --ema; torch_ema's warm-up of the decay); on by default")
    p.add_argument("--no_ema", dest="ema", action="store_false",
                   help="validate, test and save the last step's parameters instead of their average")
    p.add_argument("--ema_decay", type=float, default=0.99, help="the moving average's decay")
    p.add_argument("--amsgrad", action="store_true", default=True,
                   help="Adam's AMSGrad variant (MACE's --amsgrad); on by default")
    p.add_argument("--no_amsgrad", dest="amsgrad", action="store_false", help="plain Adam")


def _loss_flags(p: argparse.ArgumentParser) -> None:
    """MACE's loss: its name, its weights, Huber's delta."""
    p.add_argument("--loss", help="MACE's loss: mean squares, by the weights they imply: weighted or ef (energies "
                                  "and forces), stress (--stress_weight 1 unless given), virials (MACE's virials per "
                                  "atom, --virials_weight 1 unless given), forces_only (--energy_weight "
                                  "0); or Huber's (huber; universal: the forces' delta smaller where |F_ref| >= 100 "
                                  "eV/Å), stresses in it with --stress_weight (MACE's 1 is not implied: frames "
                                  "without a stress label would train their stress to 0 in MACE); default: mean "
                                  "squares, stresses trained where --stress_weight > 0")
    p.add_argument("--huber_delta", type=float, help="the delta of --loss huber and universal (default 0.01, MACE's)")
    p.add_argument("--virials_weight", type=float,
                   help="with --loss virials: the weight of MACE's virials term, the error of the virials per atom "
                        "W/N = -S V/N (eV) of the frames with a stress or virials label (default 1)")
    p.add_argument("--stage_two_virials_weight", "--swa_virials_weight", type=float,
                   help="with --loss virials: Stage Two's virials weight (default 10)")
    p.add_argument("--energy_weight", type=float,
                   help="weight of the per-atom energy error in the loss (default 1, 0 with --loss forces_only)")
    p.add_argument("--forces_weight", type=float, default=100.0, help="weight of the force error in the loss")
    p.add_argument("--config_type_weights",
                   help="MACE's per-frame weights: a dict '{config_type: weight}' (frames without a config_type are "
                        "Default's), times each frame's config_weight; config_<label>_weight in a frame's info "
                        "weighs one label (energy, forces, stress, virials, magforces, magmom). The loss counts "
                        "weight x error; the errors leave out what weighs 0")
    p.add_argument("--stress_weight", type=float,
                   help="weight of the stress error (eV/Å^3, MACE's stress loss) in the loss (default 0, 1 with "
                        "--loss stress); > 0 reads stresses under --stress_key, trains them where frames have them "
                        "and reports their errors")


def _delta_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the delta methods (sparse, lora)."""
    from ..finetune.methods import MODES, SPARSE_MODES, choices_help

    p.add_argument("--density", type=float, default=0.03, help="sparse: target fraction of path weights changed")
    p.add_argument("--mode", default="str", choices=SPARSE_MODES, help="sparse: " + choices_help(MODES, SPARSE_MODES))
    p.add_argument("--tile", type=int, default=8, help="sparse --mode block: square tile size")
    p.add_argument("--fast_after", type=int,
                   help="sparse str/block: after this many epochs train only the active entries")
    p.add_argument("--density_warmup", type=float, default=0.0,
                   help="sparse str/block: epochs over which the density rises from 0 (the base model) to its peak "
                        "(0: one step)")
    p.add_argument("--density_peak", type=float, help="sparse str/block: the density after the warmup "
                                                      "(default: --density)")
    p.add_argument("--density_anneal", type=float, default=0.0,
                   help="sparse str/block: epochs over which the density falls from its peak to --density")
    p.add_argument("--element_resolved", action="store_true",
                   help="sparse (str, block), lora: the weights shared across elements (irrep linears) get one "
                        "delta per element, W[z] = W0 + dW[z], the training data's elements starting nonzero; "
                        "--density counts their copies. No merged model then (the adapter is the result)")
    p.add_argument("--lora_rank", type=int, default=4, help="lora: rank per path block")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parsed(argv)
    nproc = vars(args).pop("nproc")
    from ..finetune.distributed import launched_size

    launched = launched_size()
    if nproc < 1 or (launched > 1 and nproc not in (1, launched)):
        return _error(f"--nproc must be >= 1 (and, under torchrun, its number of processes, {launched}); "
                      f"got {nproc}")
    if nproc > 1 and launched == 1:
        return _guarded(lambda: _launch(argv, args, nproc), args.out)
    return _guarded(lambda: _finetune(args), args.out)


def _parsed(argv: List[str]) -> argparse.Namespace:
    from .config_file import with_config
    from .mace_options import architecture_refusal, refusal

    p = parser()
    tokens = with_config(p, argv)
    args, unrecognized = p.parse_known_args(tokens)
    message = refusal(unrecognized) if unrecognized else None
    if message:
        p.error(message)
    for model in _models(tokens):  # (each --model: after --foundation_model or before it)
        if architecture_refusal(model):
            p.error(architecture_refusal(model))
    both = _both_ways(p, argv)
    if both:  # argparse would keep the last one, silently
        p.error(f"{both} set the same option both ways: keep one")
    vars(args).pop("config")  # (read by with_config)
    _weights_of_loss(p, args)
    return args


def _both_ways(p: argparse.ArgumentParser, argv: List[str]) -> Optional[str]:
    """A switch and its opposite (--ema and --no_ema) both on the command line ``argv``
    (a --config file's value yields to either, as the command line wins), or None."""
    given = set(argv[:argv.index("--")] if "--" in argv else argv)
    by_dest: dict = {}
    for action in p._actions:
        if action.nargs == 0 and isinstance(action.const, bool):  # (store_true, store_false)
            for option in set(action.option_strings) & given:
                by_dest.setdefault(action.dest, {})[action.const] = option
    pairs = [f"{ways[True]} and {ways[False]}" for ways in by_dest.values() if len(ways) == 2]
    return pairs[0] if pairs else None


def _models(tokens: List[str]) -> List[str]:
    """The values of every ``--model`` among the command line's ``tokens``."""
    given = [t.partition("=")[2] for t in tokens if t.startswith("--model=")]
    return given + [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--model"]


def training_settings(argv: List[str]) -> dict:
    """The trainer's settings (``settings.Settings``' fields) of a command line, as the
    command reads it (a --config file, --loss), less the launcher's --nproc: what a
    script passes to ``trainer.run``."""
    args = vars(_parsed(argv))
    args.pop("nproc")
    return args


LOSSES = ("weighted", "ef", "stress", "virials", "forces_only", "huber", "universal")  # MACE's --loss choices offered
_WITH_STRESS = (None, "stress", "virials", "huber", "universal")  # (MACE's Huber losses have its stress term)


def _weights_of_loss(p: argparse.ArgumentParser, args) -> None:
    """MACE's ``--loss`` turned into the trainer's penalty and the loss weights it implies
    (MACE's defaults where not given), and refused where it and a given weight disagree:
    stresses in the loss where ``stress_weight`` > 0."""
    from ..finetune.penalty import PENALTIES

    loss = args.loss
    if loss is not None and loss not in LOSSES:
        p.error(f"--loss {loss} is not offered: sparsekern trains MACE's {', '.join(LOSSES)} losses")
    _virials_of_loss(p, args)
    if loss not in _WITH_STRESS and args.stress_weight:
        p.error(f"--loss {loss} does not train stresses: --stress_weight needs --loss stress, huber or universal "
                f"(or no --loss)")
    if loss == "forces_only":
        if args.energy_weight:
            p.error("--loss forces_only trains forces alone: leave --energy_weight out")
        if args.stage_two:  # (MACE refuses it too: Stage Two's weights are the energies')
            p.error("--stage_two raises the energies' weight: not with --loss forces_only")
    args.energy_weight = (0.0 if loss == "forces_only" else 1.0) if args.energy_weight is None else args.energy_weight
    args.stress_weight = (1.0 if loss == "stress" else 0.0) if args.stress_weight is None else args.stress_weight
    args.loss = loss if loss in PENALTIES else "weighted"


def _virials_of_loss(p: argparse.ArgumentParser, args) -> None:
    """MACE's ``--loss virials``: the stress term as its virials per atom (``virials``), at
    ``--virials_weight`` (MACE's 1) and Stage Two's ``--stage_two_virials_weight`` (10)."""
    weights = (("--virials_weight", args.virials_weight), ("--stage_two_virials_weight", args.stage_two_virials_weight))
    given = [flag for flag, value in weights if value is not None]
    args.virials = args.loss == "virials"
    if not args.virials:
        if given:  # they would change nothing, silently
            p.error(f"{' and '.join(given)} weigh MACE's virials term: give --loss virials (stresses: --stress_weight)")
    else:
        stress_flags = [flag for flag, value in (("--stress_weight", args.stress_weight),
                                                ("--stage_two_stress_weight", args.stage_two_stress_weight))
                        if value is not None]
        if stress_flags:
            p.error(f"--loss virials weighs the virials: {' and '.join(stress_flags)} -> --virials_weight, "
                    f"--stage_two_virials_weight")
        args.stress_weight = 1.0 if args.virials_weight is None else args.virials_weight
        args.stage_two_stress_weight = args.stage_two_virials_weight
    del args.virials_weight, args.stage_two_virials_weight


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


PROG = "sparsekern finetune"


def _error(message, prog: str = PROG) -> int:
    where = f" (rank {_rank()})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"{prog}{where}: error: {message}", file=sys.stderr)
    return 2


def _guarded(action: Callable[[], int], out: str, prog: str = PROG) -> int:
    """``action()``'s exit code, with a one-line message for what the user can fix
    (``prog``: the command that says it)."""
    from ..finetune.distributed import FromMain
    from ..finetune.preemption import Preempted

    try:
        return action()
    except FromMain as exc:  # every rank has it: rank 0 says it
        return _error(exc, prog) if _rank() == 0 else 2
    except (OSError, KeyError, ValueError, FloatingPointError, MemoryError) as exc:  # (OSError: a path unwritable)
        return _error(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc, prog)
    except ImportError as exc:  # the model's family lives in another environment
        return _error(f"{exc} (MACE models need mace-torch, SevenNet models sevenn; "
                      "the Makefile's .venv-mace and .venv-sevenn have them)", prog)
    except Preempted as exc:  # every rank stops at the same step; rank 0 says so
        if _rank() == 0:
            print(f"{prog}: {exc}; checkpoint written to {_checkpoint(out)}; rerun the "
                  f"same command to resume", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if _rank() == 0:  # (every rank gets the Ctrl-C: one says so)
            then = (f"rerun the same command to resume from the last checkpoint in {out}" if _checkpoint(out).is_file()
                    else "no checkpoint was written yet: a rerun starts over")
            print(f"\n{prog}: interrupted; {then}", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not _in_collective(exc):
            raise
        return _error("another process of the run stopped, so this one stops too (its message says why)", prog)


def _checkpoint(out: str) -> Path:
    from ..finetune.checkpoint import CHECKPOINT

    return Path(out) / CHECKPOINT


def _in_collective(exc: BaseException) -> bool:
    """Raised by a torch.distributed collective in a run of several processes: a peer
    that failed (its own message says why) closed its connection."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = os.path.join("torch", "distributed", "")
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and tb is not None and where in tb.tb_frame.f_code.co_filename


def _finetune(args) -> int:
    from contextlib import redirect_stdout

    from ..finetune.settings import Settings
    from ..finetune.trainer import run

    with redirect_stdout(sys.stderr):  # stdout is the metrics' JSON alone (MACE prints on import)
        metrics = run(Settings(**vars(args)))
    if _rank() == 0:
        print(json.dumps({k: metrics[k] for k in _printed(metrics)}, indent=1))
        for path in metrics["files"]:  # on stderr, beside the progress bar: stdout stays JSON
            print(f"wrote: {path}", file=sys.stderr)
        if metrics["selected_epoch"] != metrics["epochs"] or metrics.get("stopped_by_patience"):
            stopped = f"; --patience stopped the run after epoch {metrics['epochs']}" if metrics.get(
                "stopped_by_patience") else ""
            print(f"the result is epoch {metrics['selected_epoch']} ({metrics['selected_by']}{stopped})",
                  file=sys.stderr)
        if metrics.get("valid_loss_above_zero_shot"):
            print(f"warning: {_worse(metrics)}", file=sys.stderr)
        if metrics.get("worse_than_zero_shot"):
            print(f"warning: {_worse_errors(metrics)}", file=sys.stderr)
        if metrics.get("training_loss_diverged"):
            print(f"warning: the training loss diverged: {metrics['training_loss_diverged']} (a lower --lr may help)",
                  file=sys.stderr)
        if metrics.get("untrained_elements"):
            print(f"warning: the test/validation frames hold atomic numbers {metrics['untrained_elements']} that no "
                  f"training frame holds: their energies keep the base model's per-element reference", file=sys.stderr)
        if metrics.get("isolated_atoms_set_aside"):
            print(f"warning: {_isolated(metrics['isolated_atoms_set_aside'], metrics['settings']['e0s'])}",
                  file=sys.stderr)
        if metrics.get("merged_model_skipped"):
            print(f"no merged model: {metrics['merged_model_skipped']}", file=sys.stderr)
        if metrics["evaluated_on"] != "test":
            print(f"warning: no --test: the errors are the {_NOT_TESTED[metrics['evaluated_on']]}", file=sys.stderr)
        for split in ("test", "valid"):
            if metrics[f"{split}_frames_in_train"]:
                print(f"warning: {metrics[f'{split}_frames_in_train']} of {metrics[f'n_{split}']} {split} frames are "
                      f"training frames too: their errors are not held-out errors", file=sys.stderr)
    return 0


def _worse(metrics: dict) -> str:
    """What the warning says where the result validates worse than the base model."""
    selected = metrics["selected_epoch"]
    loss = next(h["valid_loss"] for h in metrics["history"] if h["epoch"] == selected)
    return (f"the result's validation loss ({loss:.6g}, epoch {selected}) is above the base model's "
            f"({metrics['zero_shot_valid_loss']:.6g}): fine-tuning made it worse on the validation frames "
            f"(a lower --lr, fewer epochs or more training frames may help)")


def _worse_errors(metrics: dict) -> str:
    """What the warning says where the result's errors of trained terms on the evaluated set
    are above the base model's (the figures metrics.json reports)."""
    from ..finetune.trainer import EVALUATED

    e = metrics["evaluated_on"]
    worse = ", ".join(f"{k} {metrics[f'zero_shot_{e}_{k}']:.4g} -> {metrics[f'{e}_{k}']:.4g}"
                      for k in metrics["worse_than_zero_shot"])
    return (f"fine-tuning made the {EVALUATED[e]}'s errors worse than the base model's ({worse}; zero-shot -> "
            f"fine-tuned): a lower --lr, fewer epochs or more training frames may help")


def _isolated(set_aside: dict, e0s_given: str) -> str:
    """What the warning says of the isolated-atom frames set aside (and how their energies
    would be the E0s, unless they are)."""
    counts = ", ".join(f"{len(atoms)} {split}" for split, atoms in set_aside.items())
    e0s = {int(z): e for z, e in set_aside.get("train", {}).items() if e is not None}
    hint = f"; their energies as the E0s: --E0s isolated, or '{e0s}'" if e0s and e0s_given != "isolated" else ""
    return (f"isolated-atom frames (MACE's IsolatedAtom) set aside, not trained or evaluated: {counts} (MACE sets "
            f"aside the training file's; --keep_isolated_atoms keeps them{hint})")


_NOT_TESTED = {"valid": "validation frames' (held out, but they chose the epoch)",
               "train": "training frames' own (not held out)"}


def _printed(metrics: dict) -> List[str]:
    """The metrics printed on stdout: the evaluated set's errors before and after, the
    changes and the costs."""
    e = metrics["evaluated_on"]
    errors = [f"{e}_energy_mae_mev_per_atom", f"{e}_force_mae_mev_per_A", f"zero_shot_{e}_energy_mae_mev_per_atom",
              f"zero_shot_{e}_force_mae_mev_per_A", f"zero_shot_{e}_stress_mae_mev_per_A3",
              f"{e}_stress_mae_mev_per_A3", f"{e}_magforce_mae_mev_per_muB", f"{e}_magmom_mae_muB"]
    return [k for k in errors if k in metrics] + ["changed_fraction", "trainable_params", "wall_s", "peak_rss_mb"]


def _launch(argv: List[str], args, nproc: int) -> int:
    """This command in ``nproc`` processes on this machine, by torchrun's own launcher
    (``--standalone``); each worker sees ``--nproc`` equal to its WORLD_SIZE and trains.
    Bad input is refused here first, once, before any worker starts."""
    import logging

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    import torch

    import sparsekern
    from ..files import exclusive
    from ..finetune.distributed import check_gpus
    from ..finetune.settings import Settings
    from ..finetune.trainer import check

    made = not Path(args.out).exists()
    settings = Settings(**vars(args))  # (--device checked first)
    if torch.device(settings.device).type == "cuda":
        check_gpus(settings.device, nproc)
    with exclusive(check(settings)[2]):
        pass  # another run holds the folder: say so now
    # the workers import the sparsekern this process runs, wherever they start
    root = str(Path(sparsekern.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    # torchrun's default is 1 thread per worker (and a warning); share the cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # a signalled worker finishes its step and writes the checkpoint: torchrun's 30 s before
    # SIGKILL is shorter than a step of a large model on CPU
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    for name in list(logging.root.manager.loggerDict):  # each elastic module sets its own level
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # the workers say what went wrong
    launch = torchrun.parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", "sparsekern"])
    launch.training_script_args = ["finetune", *argv]  # not parsed by torchrun: ours, as given
    try:
        torchrun.run(launch)
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        if code < 0:  # killed by a signal before it could say anything
            _error(f"a worker was killed by signal {-code}; rerun the same command to resume")
        return _unmade(args.out, made, code if code >= 0 else 128 - code)
    except SignalException as exc:  # this launcher was signalled; torchrun passed it on to the workers
        return _unmade(args.out, made, 128 + int(exc.sigval))
    return 0


def _unmade(out: str, made: bool, code: int) -> int:
    """``code``, the folder ``out`` removed if this launcher ``made`` it and the workers
    failed before writing in it."""
    if made:
        try:
            Path(out).rmdir()
        except OSError:  # (it holds a checkpoint or more: kept)
            pass
    return code
