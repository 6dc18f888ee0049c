"""Which entries and which steps make a 0.5 % delta work (not CI; NOTES.md, "0.5 % at
parity", third round). One ``sparsekern finetune`` run with one experimental change the
library does not offer (each lost against the defaults, so none became an option):

- ``--scores S --spread P``: the saliency mode's fixed mask (trained from zero), chosen
  by S instead of the Fisher diagonal: ``fisher`` (the library's), ``random``, or
  ``full_delta`` (|W_full - W0| of a finished full fine-tuning run, ``--full_run``: the
  mask of lottery-ticket sparse fine-tuning, Ansell et al. 2022); P ``global`` (the top
  entries over all weights, as the library does) or ``group`` (the same fraction of
  every path block, so the budget is spread as a random start spreads it) or ``budget``
  (random entries, each path block's share of the budget following the RMS of the loss
  gradient over its entries at the base: the Fisher places the budget, chance the
  entries, since the Fisher's own entries are too sensitive for a large lr);
- ``--one_lr``: one lr for every delta, as the trainer had before each sparse delta's lr
  followed its base weight's scale (``finetune.lr_scale``, which this study found;
  the rows measured before it need this flag to be rerun);
- ``--no_amsgrad``: plain Adam;
- ``--train_energy_scale LR``: SevenNet's per-element energy scale and shift
  (``rescale_atomic_energy``, which full fine-tuning trains and the deltas keep frozen)
  trained beside the deltas, at their own lr LR;
- ``--prune_by taylor``: with a density that anneals (``--density_peak``,
  ``--density_anneal``), the entries dropped as the density falls are the active ones of
  least first-order importance |dL/dd_i d_i| (an average over steps; movement pruning,
  Sanh et al. 2020, Molchanov et al. 2019), not the smallest |V| as the threshold drops
  them: Adam moves an entry by about lr per step, so |V| ranks by how steadily an
  entry's gradient kept its sign, not by what it did for the loss. Dropped entries stay
  zero;
- ``--lr_follows_density``: with a density schedule, each step's lr is the default lr of
  that step's density (``methods.default_lr``: 0.1 at 3 % and above, 0.3 at 0.5 % with
  ``--no_ema``, 0.6 with the average), scaled
  as the given ``--lr`` is to the target's: Adam's loss decrease per step grows as
  lr x density, so a dense phase at the target's large lr over-steps.

Everything after ``--`` goes to ``sparsekern finetune`` unchanged (the rows measured with
this script ran before the moving average was the default: add ``--no_ema`` there to rerun
them), e.g. the accuracy benchmark's aspirin split (made by benchmarks/accuracy.py):

    OMP_NUM_THREADS=1 .venv-sevenn/bin/python benchmarks/mask_candidates.py --scores random --spread group -- \\
        --model 7net-0 --train /tmp/sparsekern-accuracy/full/aspirin_train.xyz \\
        --test /tmp/sparsekern-accuracy/full/aspirin_test.xyz --epochs 10 --batch_size 4 --seed 0 \\
        --method sparse --mode saliency --density 0.005 --lr 0.3 --out runs/random_group
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsekern import delta_slot  # noqa: E402
from sparsekern.finetune import lifecycle, trainer  # noqa: E402
from sparsekern.finetune.delta import ThresholdDelta, soft_threshold  # noqa: E402
from sparsekern.finetune.density import scheduled_density  # noqa: E402
from sparsekern.finetune.methods import SPARSE_LR_AT, default_lr  # noqa: E402
from sparsekern.patching import patch, patched_layers  # noqa: E402


def _blocks(flat: torch.Tensor, groups):
    """``flat`` (one target's entries in group order) cut into its path blocks."""
    return flat.split([g.numel for g in groups])


def ranks_by_group(score: torch.Tensor, groups, seed: int) -> torch.Tensor:
    """Each entry's rank within its path block, as a fraction in (0, 1] (ties broken at
    random): a global top-k of these takes the same fraction of every block."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for x in _blocks(score, groups):
        order = torch.argsort(x + 1e-30 * torch.rand(x.shape, generator=generator, dtype=x.dtype))
        r = torch.empty_like(x)
        r[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype)
        out.append(r / x.numel())
    return torch.cat(out)


def budget_by_group(fisher: torch.Tensor, groups, seed: int) -> torch.Tensor:
    """Scores whose global top-k takes random entries from each path block, as many as
    its size times the RMS of its gradient (``fisher``: squared gradients): an entry at
    random rank u in (0, 1] of a block with RMS r scores r / u, so a cut at c takes the
    entries with u < r / c, a fraction r / c of every block."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([x.mean().sqrt() / ((torch.randperm(x.numel(), generator=generator).to(x.dtype) + 1) / x.numel())
                      for x in _blocks(fisher, groups)])


def mask_scores(kind: str, spread: str, full_run, seed: int):
    """A replacement for saliency.fisher_scores choosing by ``kind`` and ``spread``; what
    is random follows the run's ``--seed``."""
    fisher = lifecycle.fisher_scores
    tuned = None
    if kind == "full_delta":
        from sparsekern.integrations.sevennet.models import load_sevennet

        tuned = dict(patched_layers(patch(load_sevennet(str(full_run), "cpu"), backend="torch")))

    def scores(targets, losses):
        if spread == "budget":  # (random entries: --scores random, checked by main)
            return [budget_by_group(s, groups, seed) for s, (*_, groups) in zip(fisher(targets, losses), targets)]
        if kind == "fisher":
            raw = fisher(targets, losses)
        elif kind == "random":
            generator = torch.Generator().manual_seed(seed)
            raw = [torch.rand(sum(g.numel for g in groups), generator=generator, dtype=torch.float64)
                   for *_, groups in targets]
        else:
            names = {id(layer): name for name, layer in patched_layers(scores.model)}
            raw = []
            for layer, param, groups in targets:
                moved = tuned[names[id(layer)]].get_parameter(param).detach() - layer.get_parameter(param).detach()
                flat = moved.reshape(-1).double().abs()
                raw.append(torch.cat([flat.narrow(0, g.offset, g.numel) for g in groups]))
        if spread == "group":
            raw = [ranks_by_group(s, groups, seed) for s, (*_, groups) in zip(raw, targets)]
        return raw

    return scores


def _drop_least_important(deltas, importance, dropped, config) -> None:
    step = deltas[0].steps
    now, before = scheduled_density(config, step), scheduled_density(config, max(step - 1, 0))
    if now < before:
        active = [soft_threshold(d.v, d.tau()) != 0 for d in deltas]
        surplus = sum(int(a.sum()) for a in active) - int(round(now * sum(d.v.numel() for d in deltas)))
        if surplus > 0:
            score = torch.cat([torch.where(a, importance[id(d)], torch.inf) for d, a in zip(deltas, active)])
            out = torch.zeros_like(score, dtype=torch.bool)
            out[torch.topk(score, surplus, largest=False).indices] = True
            for d, part in zip(deltas, out.split([d.v.numel() for d in deltas])):
                dropped[id(d)] |= part
    for d in deltas:
        d.v.masked_fill_(dropped[id(d)], 0)


def prune_by_importance(model, decay: float = 0.9) -> None:
    """Hooks for ``--prune_by taylor``: each delta's importance, an average of
    |grad x value| over its steps; before each training forward, while the scheduled
    density falls, the least important active entries are dropped for good (V = 0, kept
    there), then the density controller (the next hook) holds the rest."""
    deltas = [d for *_, d in delta_slot.iter_deltas(model) if isinstance(d, ThresholdDelta)]
    importance = {id(d): torch.zeros_like(d.v) for d in deltas}
    dropped = {id(d): torch.zeros_like(d.v, dtype=torch.bool) for d in deltas}
    for d in deltas:
        def track(grad, d=d):
            with torch.no_grad():
                importance[id(d)].mul_(decay).add_((grad * soft_threshold(d.v, d.tau())).abs(), alpha=1 - decay)
        d.v.register_hook(track)

    @delta_slot.mark_hook
    def drop(module, args):
        if module.training and torch.is_grad_enabled():  # (checked before no_grad turns it off)
            with torch.no_grad():
                _drop_least_important(deltas, importance, dropped, delta_slot.config_of(module))

    model.register_forward_pre_hook(drop, prepend=True)


def energy_scale(model) -> list:
    """SevenNet's per-element energy scale and shift."""
    params = [p for name, p in model.named_parameters() if "rescale_atomic_energy." in name]
    if not params:
        sys.exit("mask_candidates.py: --train_energy_scale: the model has no rescale_atomic_energy (not SevenNet?)")
    return params


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("mask_candidates.py: give the finetune arguments after --")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scores", choices=("fisher", "random", "full_delta"))
    p.add_argument("--spread", choices=("global", "group", "budget"), default="global")
    p.add_argument("--full_run", type=Path, help="merged_sevennet.pth of a full fine-tuning run (--scores full_delta)")
    p.add_argument("--no_amsgrad", action="store_true")
    p.add_argument("--train_energy_scale", type=float, metavar="LR")
    p.add_argument("--one_lr", action="store_true", help="the trainer's optimizer as before the lr by weight scale")
    p.add_argument("--prune_by", choices=("taylor",))
    p.add_argument("--lr_follows_density", action="store_true")
    args = p.parse_args(argv[:split])
    if args.spread != "global" and not args.scores or args.spread == "budget" and args.scores != "random":
        p.error(f"--spread {args.spread} needs --scores" + (" random" if args.spread == "budget" else ""))
    if args.train_energy_scale is not None and args.train_energy_scale <= 0:
        p.error(f"--train_energy_scale must be > 0, got {args.train_energy_scale}")
    if args.scores == "full_delta" and (args.full_run is None or not args.full_run.is_file()):
        p.error(f"--scores full_delta needs --full_run, a merged_sevennet.pth (got {args.full_run})")
    prepare = lifecycle.prepare
    if args.scores:
        run = argparse.ArgumentParser(add_help=False)
        run.add_argument("--seed", type=int, default=0)  # the finetune run's
        scores = mask_scores(args.scores, args.spread, args.full_run, run.parse_known_args(argv[split + 1:])[0].seed)
        lifecycle.fisher_scores = scores

    def prepare_with_changes(model, *a, **k):
        if args.scores:
            scores.model = model  # full_delta matches the targets to the tuned model by name
        prepare(model, *a, **k)
        if args.prune_by:
            prune_by_importance(model)
        if args.train_energy_scale:
            for p in energy_scale(model):
                p.requires_grad_(True)
        prepared.append(model)
        return model
    prepared = []
    trainer.prepare = prepare_with_changes
    if args.lr_follows_density:
        schedule = trainer._schedule

        def schedule_by_density(optimizer, settings, done, total, epoch):
            schedule(optimizer, settings, done, total, epoch)
            now = scheduled_density(delta_slot.config_of(prepared[0]), done)
            table = SPARSE_LR_AT[settings.ema]  # as the trainer's default
            factor = default_lr("sparse", max(now, settings.density), table) / default_lr("sparse", settings.density, table)
            for g in optimizer.param_groups:
                g["lr"] *= factor
        trainer._schedule = schedule_by_density
    if args.train_energy_scale:
        groups_of = trainer.parameter_groups

        def with_energy_scale(model, magnetic_lr):
            own = {id(p) for p in energy_scale(model)}
            groups = [{**g, "params": [p for p in g["params"] if id(p) not in own]} for g in groups_of(model, magnetic_lr)]
            return [g for g in groups if g["params"]] + [{"params": energy_scale(model), "lr": args.train_energy_scale}]
        trainer.parameter_groups = with_energy_scale
    make = trainer._optimizer

    def optimizer(model, settings):
        opt = make(model, settings, by_scale=not args.one_lr)
        for g in opt.param_groups:
            g["amsgrad"] = not args.no_amsgrad  # read by each step
        return opt
    trainer._optimizer = optimizer

    from sparsekern.cli.finetune import main as finetune
    return finetune(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
