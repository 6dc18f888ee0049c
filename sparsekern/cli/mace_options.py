"""MACE's training options that ``sparsekern finetune`` does not take, each with why, so
that a MACE user's command (or ``--config`` file) is refused naming what to do instead,
not as "unrecognized arguments". The options it does take, MACE's names included, are in
its --help; MACE's whole set runs under ``sparsekern mace-train``."""

from __future__ import annotations

from typing import Dict, List, Optional

# MACE's --model values: its architectures (here --model is --foundation_model)
MACE_ARCHITECTURES = ("MACE", "ScaleShiftMACE", "ScaleShiftBOTNet", "BOTNet", "AtomicDipolesMACE", "EnergyDipolesMACE",
                      "AtomicDielectricMACE", "MACELES", "PolarMACE")
_KEPT = "a fine-tuned foundation model keeps its architecture and statistics (MACE's too)"
_OPTIMIZER = ("the optimizer is Adam (--amsgrad, --no_amsgrad) at --lr under --lr_schedule constant or cosine, "
              "without weight decay or clipping")
_OUT = "every file of the run goes into --out/--name"
_REPLAY = ("replay fine-tuning on the foundation's training data is not offered: a sparse delta changes a few % of "
           "the weights and keeps the rest")

_REASONS: Dict[str, str] = {
    **dict.fromkeys(("scaling", "atomic_numbers", "mean", "std", "avg_num_neighbors", "compute_avg_num_neighbors",
                     "statistics_file", "r_max", "num_radial_basis", "num_cutoff_basis", "max_L", "max_ell",
                     "num_channels", "hidden_irreps", "MLP_irreps", "radial_MLP", "correlation", "num_interactions",
                     "interaction", "interaction_first", "gate", "radial_type", "pair_repulsion",
                     "distance_transform", "compute_statistics"), _KEPT),
    **dict.fromkeys(("optimizer", "weight_decay", "clip_grad", "scheduler", "lr_factor", "scheduler_patience",
                     "lr_scheduler_gamma", "beta", "lbfgs"), _OPTIMIZER),
    **dict.fromkeys(("log_dir", "model_dir", "checkpoints_dir", "results_dir", "work_dir", "downloads_dir",
                     "keep_checkpoints", "save_all_checkpoints"), _OUT + " (one checkpoint, DIR/checkpoint.pt)"),
    **dict.fromkeys(("multiheads_finetuning", "pt_train_file", "pt_valid_file", "weight_pt_head", "num_samples_pt",
                     "subselect_pt", "filter_type_pt", "force_mh_ft_lr", "real_pt_data_ratio_threshold",
                     "pseudolabel_replay", "foundation_filter_elements", "foundation_model_elements"), _REPLAY),
    "restart_latest": "a rerun of the same command always resumes from DIR/checkpoint.pt",
    "save_cpu": "the merged model is always saved on the CPU",
    "eval_interval": "the validation frames are evaluated every epoch",
    "error_table": "metrics.json holds the MAE and RMSE of every label trained",
    **dict.fromkeys(("plot", "plot_frequency"), "parity.png and curves.png are always written"),
    **dict.fromkeys(("wandb", "wandb_dir", "wandb_project", "wandb_entity", "wandb_name", "wandb_log_hypers"),
                    "metrics.json and curves.png hold the learning curves (no wandb)"),
    **dict.fromkeys(("num_workers", "pin_memory"), "the frames are read into memory once"),
    **dict.fromkeys(("enable_cueq", "only_cueq", "enable_oeq"), "sparsekern's kernels run the model (its `auto` back "
                                                                "end picks cuEquivariance where that is faster)"),
    **dict.fromkeys(("distributed", "launcher"), "--nproc N trains in N processes (or run it under torchrun)"),
    "compute_stress": "stresses are computed with --stress_weight",
    "compute_forces": "forces are always computed and trained",
    "lora": "LoRA is --method lora here (its rank: --lora_rank)",
    "lora_alpha": "--method lora scales its factors by their rank (--lora_rank)",
    "freeze": "--method sparse and lora train a few weights of every layer, full all of them",
    "heads": "one data set per run; of a multi-head foundation model, one head trains: --head NAME",
    "foundation_head": "the head trained is --head NAME here",
    "dry_run": "--epochs 0 evaluates the model without training it",
}


def reason(option: str) -> Optional[str]:
    """Why ``finetune`` does not take MACE's option ``option`` (its name without dashes),
    or None where it is not one of MACE's."""
    return _REASONS.get(option)


def refusal(unrecognized: List[str]) -> str:
    """The one-line error for the command-line tokens argparse did not recognise: each
    of MACE's options with its reason, then the other tokens as argparse says them."""
    explained: Dict[str, str] = {}
    rest: List[str] = []
    after_known = False  # (a value right after one of MACE's options is that option's)
    for token in unrecognized:
        name = token[2:].partition("=")[0] if token.startswith("--") else None
        if name is not None and reason(name):
            explained[name] = f"MACE's --{name}: {reason(name)}"
        elif not (after_known and not token.startswith("-")):
            rest.append(token)
        after_known = name is not None and reason(name) is not None and "=" not in token
    if not rest:
        return "; ".join(explained.values()) + ": leave " + ("it" if len(explained) == 1 else "them") + " out"
    return "; ".join([*explained.values(), f"unrecognized arguments: {' '.join(rest)}"])
