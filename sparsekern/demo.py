"""The main job: sparsity-promoting fine-tuning of a real foundation model on real data,
offline. SevenNet-0 (installed with sevenn) is fine-tuned on crystalline silicon
(si_mlearn: vacancies, surfaces, AIMD, strained cells; every 8th training frame) with
its pretrained weights frozen and a delta that changes 3 % of the path weights. Prints
the held-out test errors before and after, the changed fraction, the learning curves
(``training.png``), the adapter's size next to the model's, the merged model's check in
SevenNet's own ASE calculator, and where the update went (``sparsekern report``).
Everything lands in ``--out`` (default ./demo-output, ignored by git); rerunning resumes
from its checkpoint.

The loss weighs energies and forces equally (100 and 100): with MACE's first-stage
weights (1 and 100), 4 epochs on 27 frames fit the forces and let the energies of the
structure types drift apart (Si_test energy MAE 50.2 -> 103.5 meV/atom; equal weights
14.0, forces 132.9 -> 98.9 meV/A instead of 108.3; benchmarks/NOTES.md).

    make demo                                   # = .venv-sevenn/bin/python -m sparsekern.demo
    python -m sparsekern.demo --epochs 10 --method full --out demo-full   # the same budget, full fine-tuning
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

from .finetune.methods import METHODS, choices_help
from .locations import data_dir


def silicon(parser: argparse.ArgumentParser, out: Path, every: int) -> Tuple[Path, Path]:
    """(the demo's training file, every ``every``-th frame of si_mlearn's Si_train.xyz
    under ``out``, which ``write_silicon`` writes; its test file, Si_test.xyz), or the
    parser's error where the data are missing."""
    src = data_dir() / "si_mlearn"
    if not (src / "Si_train.xyz").exists():
        parser.error(f"silicon data missing under {src}; set SPARSEKERN_DATA to the data folder")
    if every < 1:
        parser.error(f"--every must be >= 1, got {every}")
    return out / f"si_train_every{every}.xyz", src / "Si_test.xyz"


def write_silicon(train: Path, every: int) -> None:
    """Write the demo's training file ``train`` (``silicon``'s), once and whole (a killed
    write leaves no part of it to be taken for the whole next time)."""
    from ase.io import read, write

    from .files import atomic_write

    if not train.exists():
        frames = read(data_dir() / "si_mlearn" / "Si_train.xyz", index=f"::{every}")
        atomic_write(train, lambda tmp: write(tmp, frames, format="extxyz"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="sparse", choices=tuple(METHODS), help=choices_help(METHODS))
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every", type=int, default=8, help="train on every N-th frame of Si_train.xyz")
    parser.add_argument("--energy_weight", type=float, default=100.0, help="the loss's energy weight (forces: 100)")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)

    train, test = silicon(parser, args.out, args.every)
    from .cli.finetune import _guarded

    # bad arguments, a checkpoint in --out from other ones, no sevenn: one line, as finetune says it
    code = _guarded(lambda: _demo(args, train, test), str(args.out / args.method), prog="sparsekern.demo")
    if code:
        parser.exit(code)
    return 0


def _demo(args, train: Path, test: Path) -> int:
    """The run, each check before anything is written, and what it prints."""
    from .files import check_output_folder
    from .finetune.settings import Settings
    from .finetune.trainer import check_model, run

    settings = Settings(model="7net-0", train=str(train), test=str(test), method=args.method, density=args.density,
                        epochs=args.epochs, energy_weight=args.energy_weight, out=str(args.out / args.method))
    check_output_folder(settings.out)  # (--out not a file: the training file goes there first)
    check_model(settings)  # (sevenn installed)
    write_silicon(train, args.every)
    _print_results(args, run(settings))
    return 0


def _print_results(args, m: dict) -> None:
    from .finetune.report import build_report, verdict_line, write_report
    from .finetune.trainer import CURVES, PARITY

    print(f"\nSevenNet-0 on silicon: {m['n_train']} training frames, {m['n_test']} test frames (Si_test.xyz), "
          f"{m['epochs']} epochs, method {args.method}, lr {m['settings']['lr']:g}, loss weights energy "
          f"{m['settings']['energy_weight']:g} forces {m['settings']['forces_weight']:g}")
    print(f"{'':<22}{'energy MAE (meV/atom)':>24}{'force MAE (meV/A)':>20}")
    for label, prefix in (("zero-shot", "zero_shot_test_"), ("fine-tuned", "test_")):
        print(f"{label:<22}{m[prefix + 'energy_mae_mev_per_atom']:>24.2f}{m[prefix + 'force_mae_mev_per_A']:>20.1f}")
    print(f"changed: {m['changed_params']:,} of {m['path_params']:,} path weights "
          f"({100 * m['changed_fraction']:.2f} %); training took {m['wall_s']:.0f} s, peak memory "
          f"{m['peak_rss_mb']:.0f} MB")
    if m["history"]:
        print(f"learning curves: {Path(m['merged_model']).parent / CURVES}")
    print(f"the test set's predictions before and after: {Path(m['merged_model']).parent / PARITY}")
    merged = Path(m["merged_model"])
    check = m["merged_model_check"]
    if "adapter" in m:
        print(f"adapter {m['adapter']}: {m['adapter_bytes'] / 1e3:.0f} kB "
              f"(the merged model file: {merged.stat().st_size / 1e6:.1f} MB)")
    print(f"merged model {merged}, in SevenNetCalculator: energy within {check['max_abs_energy_diff_ev']:.1e} eV "
          f"and forces within {check['max_abs_force_diff_ev_per_A']:.1e} eV/A of the fine-tuned model")
    if args.method == "sparse":
        report = build_report(m["adapter"])
        png, _ = write_report(report, merged.parent, "adapter.report")
        print(f"where the update went: {png} ({verdict_line(report)})")


if __name__ == "__main__":
    raise SystemExit(main())
