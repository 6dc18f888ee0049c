"""``sparsekern mace-train``: MACE's own training script (``mace_run_train`` of
mace-torch 0.3.16, every flag of it) where only sparse deltas train.

Three functions that ``mace.cli.run_train.run`` calls are wrapped while it runs:
- ``configure_model``: remembers the foundation model it is given;
- ``get_params_options``: the model arrives with the foundation weights loaded and
  leaves prepared (patched, base frozen, deltas attached) before the optimizer is
  built; the parameter groups then hold only trainable tensors: each delta sits in
  the group of the base weight it changes (so MACE's learning-rate factors and its
  weight decay, a pull towards the foundation, apply as to that weight), thresholds
  in groups of their own without decay;
- ``deepcopy``: run_train saves ``deepcopy(model)``; that copy is merged and unpatched
  (plain MACE modules, loadable without sparsekern), and the adapter is written
  beside the ``.model`` (``<name>.adapter.safetensors``, ``<name>_stagetwo...`` for
  the stage-two model).
With ``--lora True`` MACE's own LoRA runs and nothing of sparsekern is applied."""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import torch

SPARSE_PREFIX = "--sparse_"


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
    parser.description = ("MACE's mace_run_train with sparsity-promoting fine-tuning: the foundation model's "
                          "weights stay frozen and a sparse delta (a few % of the path weights) trains. Saves a "
                          "plain MACE .model (delta merged) and <name>.adapter.safetensors.")
    group = parser.add_argument_group("sparsekern (sparse delta; ignored with --lora True)")
    group.add_argument("--sparse_density", type=float, default=0.03,
                       help="fraction of the path weights that change")
    group.add_argument("--sparse_mode", choices=("str", "block"), default="str",
                       help="str: element-wise soft threshold (the paper); block: group soft threshold over tiles")
    group.add_argument("--sparse_tile", type=_tile, default="8x8",
                       help="block mode: tile as ROWSxCOLS or 'path' for whole path matrices")
    group.add_argument("--sparse_init_scale", type=float, default=1e-3,
                       help="std of the initial delta relative to the base weights' std")
    group.add_argument("--sparse_lr_factor", type=float, default=1.0,
                       help="multiplies MACE's learning rate (with its per-module factors) for the deltas: Adam "
                            "moves each entry by about lr per step, and a delta that changes a few %% of the "
                            "weights needs larger moves per entry than full fine-tuning: on SevenNet-0 the "
                            "best sparse lr was 33x full's (benchmarks/results/lr_sweep_*); with MACE's "
                            "default --lr 0.01, try 10")
    group.add_argument("--sparse_include_radial", type=str2bool, default=True,
                       help="also put deltas on the radial MLPs that make the conv weights")
    group.add_argument("--sparse_backend", choices=("auto", "torch", "triton", "cuda"), default="auto",
                       help="sparsekern kernel back end")
    group.add_argument("--sparse_seed", type=int, default=None, help="seed of the delta's start (None: MACE's --seed)")
    return parser


def _sparse_config(ours: dict, seed: int):
    from ..finetune import SparseConfig

    return SparseConfig(density=ours["sparse_density"], mode=ours["sparse_mode"], tile=ours["sparse_tile"],
                        init_scale=ours["sparse_init_scale"], include_radial=ours["sparse_include_radial"],
                        seed=seed if ours["sparse_seed"] is None else ours["sparse_seed"])


def main(argv: Optional[List[str]] = None) -> int:
    import mace  # noqa: F401  (also lets e3nn 0.4.4 import under torch >= 2.6)
    from mace.cli import run_train

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    ours = {k: v for k, v in vars(args).items() if k.startswith("sparse_")}
    for key in ours:
        delattr(args, key)  # MACE's code sees its own arguments only
    given = sorted({a.split("=")[0] for a in argv if a.startswith(SPARSE_PREFIX)})
    if args.lora:
        if given:
            parser.error(f"--lora True runs MACE's LoRA; the sparse-delta flags {given} do not apply with it")
        run_train.run(args)
        return 0
    if args.foundation_model is None:
        parser.error("sparse deltas fine-tune a pretrained model: give --foundation_model "
                     "(to train from scratch, use mace_run_train)")
    if args.enable_cueq or args.only_cueq or args.enable_oeq:
        parser.error("--enable_cueq/--only_cueq/--enable_oeq convert the model to other kernels; sparsekern "
                     "replaces the same layers with its own (see --sparse_backend)")
    try:
        config = _sparse_config(ours, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    if ours["sparse_lr_factor"] <= 0:
        parser.error(f"--sparse_lr_factor must be > 0, got {ours['sparse_lr_factor']}")
    hooks = SparseHooks(config, ours["sparse_backend"], args, ours["sparse_lr_factor"])
    with hooks.installed(run_train):
        run_train.run(args)
    if hooks.exports:
        from .. import stats

        s = stats(hooks.model)
        logging.info(f"sparsekern: {s['changed_params']} of {s['total_params']} path weights changed "
                     f"({100 * s['density']:.2f} %); plain MACE model and adapter in {args.model_dir}")
    return 0


class SparseHooks:
    """State shared by the wrapped functions during one ``run_train.run``."""

    def __init__(self, config, backend: str, args, lr_factor: float = 1.0) -> None:
        self.config, self.backend, self.args, self.lr_factor = config, backend, args, lr_factor
        self.foundation: Optional[torch.nn.Module] = None
        self.model: Optional[torch.nn.Module] = None
        self.exports = 0
        self.base_model: Optional[str] = None  # what the adapter applies to

    @contextmanager
    def installed(self, run_train):
        names = ("configure_model", "get_params_options", "deepcopy")
        saved = {n: getattr(run_train, n) for n in names}
        configure, options = saved["configure_model"], saved["get_params_options"]

        def configure_model(*a, **k):
            self.foundation = a[3] if len(a) > 3 else k.get("model_foundation")
            return configure(*a, **k)

        def get_params_options(args, model):
            return self.params_options(options, args, model)

        def deepcopy(obj, memo=None):
            if self.model is None or obj is not self.model:
                return copy.deepcopy(obj, memo)
            return self.export(obj)

        run_train.configure_model, run_train.get_params_options, run_train.deepcopy = (
            configure_model, get_params_options, deepcopy)
        try:
            yield self
        finally:
            for n, f in saved.items():
                setattr(run_train, n, f)

    def params_options(self, options, args, model: torch.nn.Module) -> dict:
        """MACE's ``options(args, model)`` for the model prepared here."""
        self.args = args  # run_train's own (check_args has filled in its folders)
        self.prepare(model)
        result = options(args, model)  # --freeze freezes modules here, their deltas included
        self.drop_frozen_deltas(model)
        result["params"] = self.regroup(result["params"], model)
        for g in result["params"]:
            g["lr"] = g.get("lr", result["lr"]) * self.lr_factor
        return result

    def prepare(self, model: torch.nn.Module) -> None:
        from .. import prepare, stats

        prepare(model, self.config, backend=self.backend)
        self.model = model
        s = stats(model)
        logging.info(f"sparsekern: {s['trainable_params']} trainable delta parameters on {s['total_params']} "
                     f"frozen path weights, target density {self.config.density} ({self.config.mode} mode)")

    @staticmethod
    def drop_frozen_deltas(model: torch.nn.Module) -> None:
        """A delta that MACE froze (--freeze) must not change its module: remove it and
        spread the target density over the deltas that train."""
        from ..finetune import calibrate_density, iter_deltas
        from ..finetune.api import _key

        frozen = [(name, layer, param) for name, layer, param, d in iter_deltas(model)
                  if not any(p.requires_grad for p in d.parameters())]
        for name, layer, param in frozen:
            del layer.deltas[_key(param)]
        if frozen:
            logging.info(f"sparsekern: no deltas on the {len(frozen)} weights MACE froze (--freeze), "
                         f"e.g. {frozen[0][0]}.{frozen[0][2]}")
            calibrate_density(model)

    def regroup(self, groups, model: torch.nn.Module) -> list:
        """MACE's parameter groups, holding trainable tensors only: a delta joins the
        group of the base weight it changes, thresholds go to no-decay groups."""
        from ..finetune import iter_deltas

        groups = [dict(g, params=list(g["params"])) for g in groups]
        home = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        placed = {}
        for name, layer, param, delta in iter_deltas(model):
            base = home.get(id(layer.get_parameter(param)))
            if base is None:
                raise ValueError(f"sparsekern mace-train: {name}.{param} is in none of MACE's parameter groups, "
                                 "so MACE would not train it; its delta has no optimizer group")
            for pname, p in delta.named_parameters():
                placed[id(p)] = (base, pname == "log_tau")
        out = [dict(g, params=[]) for g in groups]
        thresholds = [dict(g, name=f"{g.get('name', i)}_thresholds", weight_decay=0.0, params=[])
                      for i, g in enumerate(groups)]
        for i, g in enumerate(groups):
            for p in g["params"]:
                if not p.requires_grad:
                    continue  # the frozen base (and what --freeze froze)
                at, is_threshold = placed.get(id(p), (i, False))
                (thresholds if is_threshold else out)[at]["params"].append(p)
        return [g for g in out + thresholds if g["params"]]

    @torch.no_grad()
    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain MACE model to save (delta merged); writes the adapter beside it."""
        from .. import merge, save_adapter, unpatch
        from ..finetune import calibrate_density

        calibrate_density(model)  # the saved (e.g. EMA-averaged) deltas, on the target density
        model_dir = Path(self.args.model_dir)
        stage = "" if self.exports == 0 else "_stagetwo"  # run_train saves stage one, then stage two
        self.exports += 1
        if self.base_model is None:
            self.base_model = self._base_file(model, model_dir)
        adapter = model_dir / f"{self.args.name}{stage}.adapter.safetensors"
        save_adapter(model, adapter, extra_metadata={"base_model": self.base_model})
        logging.info(f"sparsekern: saved the adapter to {adapter} (it applies to {self.base_model})")
        merged = copy.deepcopy(model)
        merge(merged)
        unpatch(merged)
        return _plain(merged)

    def _base_file(self, model: torch.nn.Module, model_dir: Path) -> str:
        """The foundation model, where MACE fine-tunes it as it is; else the base MACE
        configured from it, saved beside the adapter."""
        from .. import patched_layers, unpatch
        from ..files import atomic_write

        base = copy.deepcopy(model)
        for _, layer in patched_layers(base):
            layer._modules.pop("deltas", None)
        base = _plain(unpatch(base))
        if self.foundation is not None and _same_state(base, self.foundation):
            return str(self.args.foundation_model)
        path = atomic_write(model_dir / f"{self.args.name}.base.model", lambda tmp: torch.save(base, tmp))
        logging.info("sparsekern: the model MACE fine-tunes differs from the foundation file (element subset, E0s, "
                     "scale/shift, readouts, or buffers a newer MACE adds); the adapter applies to it, saved to "
                     f"{path} (it also loads into the foundation where their path weights agree)")
        return str(path)


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """Drop what ``prepare`` added to the top module (density hook, config), so the
    model pickles as plain MACE; parameters trainable again, as in MACE's own files."""
    from ..finetune.api import _steer_density

    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _steer_density:
            del model._forward_pre_hooks[key]
    model.__dict__.pop("sparsekern_config", None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class and the same parameters and buffers, value for value (MACE keeps
    per-head buffers, e.g. E0s of shape (1, n) where older models hold (n,))."""
    sa, sb = a.state_dict(), b.state_dict()
    if type(a) is not type(b) or sa.keys() != sb.keys():
        return False

    def flat(t):
        return t.detach().cpu().reshape(-1).to(torch.float64 if t.is_floating_point() else t.dtype)

    return all(sa[k].numel() == sb[k].numel() and torch.equal(flat(sa[k]), flat(sb[k])) for k in sa)
