"""MACE's training options that ``sparsekern finetune`` does not take, each with why, so
that a MACE user's command (or ``--config`` file) is refused naming what to do instead,
not as "unrecognized arguments"; those whose value states what sparsekern does anyway
(``--multiheads_finetuning False``, ``--weight_decay 0``, ``--save_cpu``, ...) are
accepted. The options it does take, MACE's names included, are in its --help; MACE's
whole set runs under ``sparsekern mace-train``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# MACE's --model values: its architectures (here --model is --foundation_model)
MACE_ARCHITECTURES = ("MACE", "ScaleShiftMACE", "ScaleShiftBOTNet", "BOTNet", "AtomicDipolesMACE", "EnergyDipolesMACE",
                      "AtomicDielectricMACE", "MACELES", "PolarMACE")
_KEPT = "a fine-tuned foundation model keeps its architecture and statistics (MACE's too)"
_OPTIMIZER = ("the optimizer is Adam (--amsgrad, --no_amsgrad) at --lr under --lr_schedule constant or cosine, "
              "without weight decay or clipping")
_OUT = "every file of the run goes into --out/--name"
_REPLAY = ("replay fine-tuning on the foundation's training data is not offered here: `sparsekern mace-train` runs "
           "MACE's, with the sparse delta")
_LABELS = ("dipoles, polarizabilities, charges and spins are not trained here (energies, forces, stresses and "
           "magnetic labels are)")
_CURVES = "metrics.json and training.png hold the learning curves"

_REASONS: Dict[str, str] = {
    **dict.fromkeys(("scaling", "atomic_numbers", "mean", "std", "avg_num_neighbors", "compute_avg_num_neighbors",
                     "statistics_file", "r_max", "num_radial_basis", "num_cutoff_basis", "max_L", "max_ell",
                     "num_channels", "hidden_irreps", "MLP_irreps", "radial_MLP", "correlation", "num_interactions",
                     "interaction", "interaction_first", "gate", "radial_type", "pair_repulsion",
                     "distance_transform", "apply_cutoff", "edge_irreps", "embedding_specs", "use_agnostic_product",
                     "use_edge_irreps_first", "use_embedding_readout", "use_last_readout_only", "use_reduced_cg",
                     "use_so3", "num_recursion_steps", "foundation_model_kwargs", "les_arguments", "field_si",
                     "field_feature_max_l", "field_feature_norms", "field_feature_widths", "field_norm_factor",
                     "field_readout_config", "fixedpoint_update_config", "atomic_multipoles_max_l",
                     "atomic_multipoles_smearing_width", "kspace_cutoff_factor",
                     "include_electrostatic_self_interaction", "quadrupole_feature_corrections",
                     "add_local_electron_energy", "return_electrostatic_potentials"), _KEPT),
    **dict.fromkeys(("foundation_model_elements", "foundation_filter_elements", "foundation_model_readout"),
                    "every element of the foundation model is kept, and its readouts"),
    **dict.fromkeys(("optimizer", "weight_decay", "clip_grad", "scheduler", "lr_factor", "scheduler_patience",
                     "lr_scheduler_gamma", "beta", "lbfgs", "beta1_schedulefree", "beta2_schedulefree",
                     "lr_params_factors"), _OPTIMIZER),
    **dict.fromkeys(("log_dir", "model_dir", "checkpoints_dir", "results_dir", "work_dir", "downloads_dir",
                     "keep_checkpoints", "save_all_checkpoints"), _OUT + " (one checkpoint, DIR/checkpoint.pt)"),
    **dict.fromkeys(("multiheads_finetuning", "pt_train_file", "pt_valid_file", "weight_pt_head", "weight_pt",
                     "num_samples_pt", "subselect_pt", "filter_type_pt", "force_mh_ft_lr",
                     "real_pt_data_ratio_threshold", "pseudolabel_replay", "pseudolabel_replay_compute_stress",
                     "disallow_random_padding_pt"), _REPLAY),  # (weight_pt: MACE's docs abbreviate weight_pt_head)
    **dict.fromkeys(("dipole_key", "dipole_weight", "swa_dipole_weight", "stage_two_dipole_weight",
                     "polarizability_key", "polarizability_weight", "swa_polarizability_weight",
                     "stage_two_polarizability_weight", "compute_atomic_dipole", "compute_polarizability",
                     "charges_key", "total_charge_key", "total_spin_key", "elec_temp_key"), _LABELS),
    "restart_latest": "a rerun of the same command always resumes from DIR/checkpoint.pt",
    "save_cpu": "the merged model is always saved on the CPU",
    "eval_interval": "the validation frames are evaluated every epoch",
    "error_table": "metrics.json holds the errors (MAE, RMSE) of every label trained",
    **dict.fromkeys(("skip_evaluate_heads", "multi_processed_test", "test_dir"),
                    "the test frames are one file (--test), evaluated at the head trained"),
    **dict.fromkeys(("plot", "plot_frequency", "plot_interaction_e"), "parity.png and training.png are always written"),
    **dict.fromkeys(("wandb", "wandb_dir", "wandb_project", "wandb_entity", "wandb_name", "wandb_log_hypers"),
                    _CURVES + " (no wandb)"),
    "log_level": "the run prints its progress and warnings; " + _CURVES,
    **dict.fromkeys(("num_workers", "pin_memory"), "the frames are read into memory once"),
    **dict.fromkeys(("enable_cueq", "only_cueq", "enable_oeq"), "sparsekern's kernels run the model (its `auto` back "
                                                                "end picks cuEquivariance where that is faster)"),
    **dict.fromkeys(("distributed", "launcher"), "--nproc N trains in N processes (or run it under torchrun)"),
    "compute_stress": "stresses are computed with --stress_weight",
    "compute_forces": "forces are always computed and trained",
    "lora": "LoRA is --method lora here (its rank: --lora_rank)",
    "lora_alpha": "--method lora scales its factors by their rank (--lora_rank)",
    "freeze": "--method sparse and lora train a few weights of every layer, full all of them",
    **dict.fromkeys(("heads", "head_key"), "one data set per run; of a multi-head foundation model, one head "
                                           "trains: --head NAME"),
    "foundation_head": "the head trained is --head NAME here",
    "dry_run": "--epochs 0 evaluates the model without training it",
}


def _switch(value: bool) -> Callable[[List[str]], bool]:
    """Whether an option's values state ``value`` (MACE's str2bool words; a bare switch: true)."""
    words = ("yes", "true", "t", "y", "1") if value else ("no", "false", "f", "n", "0")
    return lambda values: (not values and value) or (len(values) == 1 and values[0].lower() in words)


def _equal(number: float) -> Callable[[List[str]], bool]:
    def stated(values: List[str]) -> bool:
        try:
            return len(values) == 1 and float(values[0]) == number
        except ValueError:
            return False
    return stated


# MACE's options given the value that states what sparsekern does: accepted as they are
# (MACE's store_true switches, --distributed and the like, state it as false in a --config file)
_STATED: Dict[str, Callable[[List[str]], bool]] = {
    "save_cpu": _switch(True), "restart_latest": _switch(True), "multiheads_finetuning": _switch(False),
    "foundation_model_elements": _switch(True), "weight_decay": _equal(0.0), "eval_interval": _equal(1.0),
    "compute_forces": _switch(True), "plot": _switch(True),
    **dict.fromkeys(("lora", "distributed", "enable_cueq", "only_cueq", "enable_oeq", "wandb", "plot_interaction_e",
                     "dry_run", "keep_checkpoints", "save_all_checkpoints", "pseudolabel_replay",
                     "compute_atomic_dipole", "compute_polarizability"), _switch(False))}


def reason(option: str) -> Optional[str]:
    """Why ``finetune`` does not take MACE's option ``option`` (its name without dashes),
    or None where it is not one of MACE's."""
    return _REASONS.get(option)


def _groups(tokens: List[str]) -> List[Tuple[Optional[str], str, List[str]]]:
    """(option name or None, its token, its values) of command-line tokens: the tokens up
    to the next ``--`` after one of MACE's options (given without ``=``) are its values
    (negative numbers, several values); other tokens stand alone."""
    groups: List[Tuple[Optional[str], str, List[str]]] = []
    open_values = False
    for token in tokens:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            groups.append((name, token, [value] if eq else []))
            open_values = not eq and reason(name) is not None
        elif open_values:
            groups[-1][2].append(token)
        else:
            groups.append((None, token, []))
    return groups


def refusal(unrecognized: List[str], unknown: str = "unrecognized arguments:") -> Optional[str]:
    """The one-line error for the command-line tokens argparse did not recognise: each of
    MACE's options with its reason, then the other tokens after ``unknown``; None where
    every one is MACE's, given a value that states what sparsekern does."""
    explained: Dict[str, str] = {}
    rest: List[str] = []
    for name, token, values in _groups(unrecognized):
        if name is not None and reason(name):
            if not (name in _STATED and _STATED[name](values)):
                explained[name] = f"MACE's --{name}: {reason(name)}"
        else:
            rest.append(token)
    if not explained and not rest:
        return None
    if not rest:
        return "; ".join(explained.values()) + ": leave " + ("it" if len(explained) == 1 else "them") + " out"
    return "; ".join([*explained.values(), f"{unknown} {' '.join(rest)}"])


def architecture_refusal(value) -> Optional[str]:
    """The error for MACE's ``--model`` (an architecture) where --model is the model
    fine-tuned; None for any other value (a file of that name too)."""
    if str(value) not in MACE_ARCHITECTURES or Path(str(value)).exists():
        return None
    return (f"--model {value} names MACE's architecture (MACE's --model); here --model (--foundation_model) is the "
            f"model fine-tuned, whose architecture is kept: leave MACE's --model out")
