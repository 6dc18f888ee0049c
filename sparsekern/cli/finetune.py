"""``sparsekern finetune``: fine-tune a foundation model (sparse delta, full, LoRA) on
an extended-XYZ data set and evaluate it; see sparsekern.finetune.trainer."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (None, switches)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    from ..finetune.methods import METHODS, MODES, SPARSE_MODES, choices_help

    p = argparse.ArgumentParser(
        prog="sparsekern finetune", formatter_class=_DefaultsShown,
        description="Fine-tune a foundation model and evaluate it. Writes DIR/metrics.json, DIR/checkpoint.pt "
                    "(rerunning the same command resumes), the adapter (sparse, lora) and a merged model for "
                    "the family's own ASE calculator.")
    p.add_argument("--model", required=True, help="7net-0 (SevenNet) or a MACE .model file")
    p.add_argument("--train", required=True, help="training frames (extended XYZ)")
    p.add_argument("--valid", help="validation frames (reported per epoch)")
    p.add_argument("--test", required=True, help="test frames")
    p.add_argument("--method", required=True, choices=tuple(METHODS), help=choices_help(METHODS))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training frames (0: evaluate only)")
    p.add_argument("--density", type=float, default=0.03, help="sparse: target fraction of path weights changed")
    p.add_argument("--mode", default="str", choices=SPARSE_MODES, help="sparse: " + choices_help(MODES, SPARSE_MODES))
    p.add_argument("--tile", type=int, default=8, help="sparse --mode block: square tile size")
    p.add_argument("--fast_after", type=int, help="sparse: after this many epochs train only the active entries")
    p.add_argument("--lora_rank", type=int, default=4, help="lora: rank per path block")
    p.add_argument("--lr", type=float,
                   help="Adam's learning rate (default per method: "
                        + ", ".join(f"{name} {m.lr:g}" for name, m in METHODS.items())
                        + ", chosen on a validation split by benchmarks/lr_sweep.py)")
    p.add_argument("--batch_size", type=int, default=4, help="frames per optimizer step")
    p.add_argument("--seed", type=int, default=0, help="seeds the delta's start and the data order")
    p.add_argument("--energy_weight", type=float, default=1.0, help="weight of the per-atom energy error in the loss")
    p.add_argument("--forces_weight", type=float, default=100.0, help="weight of the force error in the loss")
    p.add_argument("--E0s", dest="e0s", default="estimated",
                   help="foundation | estimated (least squares of the training residuals) | average | "
                        "a dict '{Z: E0}' or a .json file (MACE's meanings); estimated and average are "
                        "refitted to the trained model's training residuals after training")
    p.add_argument("--energy_key", default="REF_energy", help="energy label in the frames' info (eV)")
    p.add_argument("--forces_key", default="REF_forces", help="force label in the frames' arrays (eV/Å)")
    p.add_argument("--magmom_key", help="magnetism: per-atom moments in the frames' arrays (μB; collinear scalars "
                   "or 3-vectors); adds a magnetic energy E(R, m) beside the model, zero at the start")
    p.add_argument("--magforces_key", help="magnetism: magnetic-force labels -dE/dm (eV/μB) in the frames' arrays")
    p.add_argument("--predict_magmom", action="store_true", help="magnetism: train a head for moment magnitudes")
    p.add_argument("--magforces_weight", type=float, default=100.0, help="weight of the magnetic-force error")
    p.add_argument("--magmom_weight", type=float, default=1.0, help="weight of the moment-magnitude error")
    p.add_argument("--magnetic_lr", type=float, default=1e-2,
                   help="magnetism: Adam's learning rate of the magnetic modules")
    p.add_argument("--max_train", type=int, help="use the first N training frames")
    p.add_argument("--max_valid", type=int, help="use the first N validation frames")
    p.add_argument("--max_test", type=int, help="use the first N test frames")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    from ..finetune.trainer import Settings, run

    try:
        metrics = run(Settings(**vars(args)))
    except (FileNotFoundError, KeyError, ValueError, FloatingPointError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"sparsekern finetune: error: {message}", file=sys.stderr)
        return 2
    except ImportError as exc:  # the model's family lives in another environment
        print(f"sparsekern finetune: error: {exc} (MACE models need mace-torch, SevenNet models sevenn; "
              "the Makefile's .venv-mace and .venv-sevenn have them)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsparsekern finetune: interrupted; rerun the same command to resume from the last "
              f"checkpoint in {args.out}", file=sys.stderr)
        return 130
    keys = ("test_energy_mae_mev_per_atom", "test_force_mae_mev_per_A", "zero_shot_test_energy_mae_mev_per_atom",
            "zero_shot_test_force_mae_mev_per_A", "changed_fraction", "trainable_params", "wall_s", "peak_rss_mb")
    keys += tuple(k for k in ("test_magforce_mae_mev_per_muB", "test_magmom_mae_muB") if metrics.get(k) is not None)
    print(json.dumps({k: metrics[k] for k in keys}, indent=1))
    return 0
