"""Sparse deltas inside MACE's own training script (``mace.cli.run_train.run`` of
mace-torch 0.3.16). Six functions it calls are wrapped while it runs:

- ``configure_model``: remembers the foundation model it is given;
- ``get_params_options``: the model arrives with the foundation weights loaded and
  leaves prepared (patched, base frozen, deltas attached) before the optimizer is
  built; the parameter groups then hold only trainable tensors: each delta takes the
  options of the group of the base weight it changes (so MACE's learning-rate factors
  and its weight decay, a pull towards the foundation, apply as to that weight), in a
  group of its own whose lr also follows that weight's scale (``finetune.lr_scale``, as
  in ``sparsekern finetune``), thresholds in groups of their own without decay;
- ``get_swa``: Stage Two's scheduler (torch's SWALR) takes each group to --swa_lr / --lr
  times its own lr (MACE's drop; one --swa_lr for every group would undo the deltas'
  factor and scales); which of the saved models is Stage Two's is its list's;
- ``tools.train``: on a GPU, the Triton kernels of a training step and an evaluation
  are compiled at once before it starts (``finetune.precompile``);
- ``take_step``: its loss's ``backward()`` goes into the optimizer's tensors alone, not
  also into the positions (``finetune.backward``: a force-training step's derivatives
  wrt the positions, which nothing reads, are skipped);
- ``deepcopy``: run_train saves ``deepcopy(model)``; that copy is merged and released
  (plain MACE modules, loadable without sparsekern), and the adapter is written
  beside the ``.model`` (``<name>.adapter.safetensors``, ``<name>_stagetwo...`` for
  the stage-two model)."""

from __future__ import annotations

import copy
import importlib
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch

from ... import delta_slot
from ...files import atomic_write
from ...finetune import merge, prepare, save_adapter, stats
from ...finetune.backward import backward, into_trained
from ...finetune.density import calibrate_to_schedule
from ...finetune.lr_scale import by_weight_scale
from ...finetune.precompile import compiles_kernels, precompile_on_copy
from ...patching import patched_layers, release


class Refused(Exception):
    """Sparse fine-tuning cannot go on with the model MACE built (a density that keeps
    none of its path weights) or save what it trained (deltas of NaN): said in one line by
    ``sparsekern mace-train``."""


class SparseHooks:
    """State shared by the wrapped functions during one ``run_train.run``."""

    def __init__(self, config, backend: str, args, lr_factor: Callable[[float], float] = lambda lr: 1.0) -> None:
        self.config, self.backend, self.args, self.lr_factor = config, backend, args, lr_factor
        self.mace_lr: Optional[float] = None  # MACE's lr where it builds the optimizer (replay lowers it)
        self.stages = [False]  # run_train's: whether each model it saves is Stage Two's
        self.foundation: Optional[torch.nn.Module] = None
        self.heads_cut = False  # MACE kept one head of a multi-head foundation: the file is not the base
        self.model: Optional[torch.nn.Module] = None
        self.exports = 0
        self.base_model: Optional[str] = None  # what the adapter applies to

    @contextmanager
    def installed(self, run_train):
        names = ("configure_model", "get_params_options", "deepcopy", "remove_pt_head", "get_swa")
        saved = {n: getattr(run_train, n) for n in names}
        configure, options, cut = saved["configure_model"], saved["get_params_options"], saved["remove_pt_head"]

        def get_swa(*a, **k):
            swa, self.stages = self.stage_two(saved["get_swa"], *a, **k)
            return swa, self.stages

        def remove_pt_head(*a, **k):
            self.heads_cut = True
            return cut(*a, **k)

        def configure_model(*a, **k):
            self.foundation = a[3] if len(a) > 3 else k.get("model_foundation")
            return configure(*a, **k)

        def get_params_options(args, model):
            return self.params_options(options, args, model)

        def deepcopy(obj, memo=None):
            if self.model is None or obj is not self.model:
                return copy.deepcopy(obj, memo)
            return self.export(obj)

        tools, train = run_train.tools, run_train.tools.train
        steps = importlib.import_module("mace.tools.train")  # the module (tools.train is its function)
        take_step = steps.take_step

        def train_after_precompile(*a, **k):
            self.precompile(k)
            return train(*a, **k)

        def take_step_into_trained(model, loss_fn, batch, optimizer, *a, **k):
            trained = [p for g in optimizer.param_groups for p in g["params"]]
            return take_step(model, into_trained(loss_fn, trained), batch, optimizer, *a, **k)

        (run_train.configure_model, run_train.get_params_options, run_train.deepcopy, run_train.remove_pt_head,
         run_train.get_swa) = (configure_model, get_params_options, deepcopy, remove_pt_head, get_swa)
        tools.train, steps.take_step = train_after_precompile, take_step_into_trained
        try:
            yield self
        finally:
            for n, f in saved.items():
                setattr(run_train, n, f)
            tools.train, steps.take_step = train, take_step

    def precompile(self, k: dict) -> None:
        """On a GPU, the Triton kernels of MACE's training step (its loss; forces, virials
        and stress as it asks) and of its evaluation, on the first training batch,
        compiled before ``tools.train`` (its keyword arguments ``k``) starts: by rank 0,
        the others waiting (``finetune.precompile``)."""
        device = k.get("device")
        if self.model is None or device is None or not compiles_kernels(device):
            return
        if k.get("rank", 0) == 0:
            flags = {f"compute_{name}": k["output_args"][key]
                     for name, key in (("force", "forces"), ("virials", "virials"), ("stress", "stress"))}

            def passes(scratch):
                batch = next(iter(k["train_loader"])).to(device)
                backward(k["loss_fn"](pred=scratch(batch.to_dict(), training=True, **flags), ref=batch),
                         [p for p in scratch.parameters() if p.requires_grad])
                scratch.eval()
                scratch(batch.to_dict(), training=False, **flags)

            precompile_on_copy(k["model"], passes, device)
        if k.get("distributed"):
            torch.distributed.barrier()

    def params_options(self, options, args, model: torch.nn.Module) -> dict:
        """MACE's ``options(args, model)`` for the model prepared here."""
        self.args = args  # run_train's own (check_args has filled in its folders)
        self.prepare(model)
        result = options(args, model)  # --freeze freezes modules here, their deltas included
        self.drop_frozen_deltas(model)
        result["params"] = by_weight_scale(model, self.regroup(result["params"], model), result["lr"])
        self.mace_lr = result["lr"]
        factor = self.lr_factor(self.mace_lr)
        for g in result["params"]:
            g["lr"] = g.get("lr", result["lr"]) * factor
        return result

    def stage_two(self, get_swa, *a, **k):
        """MACE's ``get_swa`` with its SWALR given one --swa_lr per group: --swa_lr / --lr
        times the group's lr."""
        utils = importlib.import_module("mace.tools.scripts_utils")
        swalr = utils.SWALR

        def per_group(optimizer, swa_lr, **kw):
            return swalr(optimizer, swa_lr=[g["lr"] * swa_lr / self.mace_lr for g in optimizer.param_groups], **kw)

        utils.SWALR = per_group
        try:
            return get_swa(*a, **k)
        finally:
            utils.SWALR = swalr

    def prepare(self, model: torch.nn.Module) -> None:
        try:
            prepare(model, self.config, backend=self.backend)
        except ValueError as exc:  # (found once MACE has built the model: the earliest it can be)
            raise Refused(str(exc)) from exc
        self.model = model
        s = stats(model)
        logging.info(f"sparsekern: {s['trainable_params']} trainable delta parameters on {s['total_params']} "
                     f"frozen path weights, target density {self.config.density} ({self.config.mode} mode)")

    @staticmethod
    def drop_frozen_deltas(model: torch.nn.Module) -> None:
        """A delta that MACE froze (--freeze) must not change its module: remove it and
        spread the target density over the deltas that train."""
        frozen = [(name, layer, param) for name, layer, param, d in delta_slot.iter_deltas(model)
                  if not any(p.requires_grad for p in d.parameters())]
        for _, layer, param in frozen:
            delta_slot.detach(layer, param)
        if frozen:
            logging.info(f"sparsekern: no deltas on the {len(frozen)} weights MACE froze (--freeze), "
                         f"e.g. {frozen[0][0]}.{frozen[0][2]}")
            calibrate_to_schedule(model)

    def regroup(self, groups, model: torch.nn.Module) -> list:
        """MACE's parameter groups, holding trainable tensors only: a delta joins the
        group of the base weight it changes, thresholds go to no-decay groups."""
        groups = [dict(g, params=list(g["params"])) for g in groups]
        home = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        placed = {}
        for name, layer, param, delta in delta_slot.iter_deltas(model):
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
        calibrate_to_schedule(model)  # the saved (e.g. EMA-averaged) deltas, at the scheduled density
        model_dir = Path(self.args.model_dir)
        stage = "_stagetwo" if self.stages[min(self.exports, len(self.stages) - 1)] else ""
        self.exports += 1
        if self.base_model is None:
            self.base_model = self._base_file(model, model_dir)
        adapter = model_dir / f"{self.args.name}{stage}.adapter.safetensors"
        try:
            save_adapter(model, adapter, extra_metadata={"base_model": self.base_model})
        except ValueError as exc:  # (deltas of NaN: training diverged) said in one line, no model saved
            raise Refused(str(exc)) from exc
        logging.info(f"sparsekern: saved the adapter to {adapter} (it applies to {self.base_model})")
        merged = copy.deepcopy(model)
        merge(merged)
        return release(merged)

    def _base_file(self, model: torch.nn.Module, model_dir: Path) -> str:
        """The foundation model, where MACE fine-tunes it as it is; else the base MACE
        configured from it, saved beside the adapter."""
        base = copy.deepcopy(model)
        for _, layer in patched_layers(base):
            delta_slot.detach(layer)
        base = release(base)
        if self.foundation is not None and not self.heads_cut and _same_state(base, self.foundation):
            return str(Path(self.args.foundation_model).resolve())  # (the adapter lies in another folder)
        path = atomic_write(model_dir / f"{self.args.name}.base.model", lambda tmp: torch.save(base, tmp))
        logging.info("sparsekern: the model MACE fine-tunes differs from the foundation file (element subset, E0s, "
                     "scale/shift, readouts, one head of several, or buffers a newer MACE adds); the adapter applies "
                     f"to it, saved to {path}")
        return str(Path(path).resolve())  # (read from the adapter's folder, a relative one would not be found)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class and the same parameters and buffers, value for value (MACE keeps
    per-head buffers, e.g. E0s of shape (1, n) where older models hold (n,))."""
    sa, sb = a.state_dict(), b.state_dict()
    if type(a) is not type(b) or sa.keys() != sb.keys():
        return False

    def flat(t):
        return t.detach().cpu().reshape(-1).to(torch.float64 if t.is_floating_point() else t.dtype)

    return all(sa[k].numel() == sb[k].numel() and torch.equal(flat(sa[k]), flat(sb[k])) for k in sa)
