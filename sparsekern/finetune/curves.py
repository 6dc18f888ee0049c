"""A run's learning curves as a picture (``training.png`` beside metrics.json): the
training and validation losses by epoch (and the base model's validation loss), and the
validation energy, force (and, with stress labels, stress) errors by epoch beside the base
model's validation errors and the evaluated set's (the test set's, else the validation or
training set's) before and after fine-tuning, the latter at the epoch whose model is the
result; a line where Stage Two starts, where it runs."""

from __future__ import annotations

from pathlib import Path

PANELS = (("energy_mae_mev_per_atom", "energy MAE (meV/atom)"), ("force_mae_mev_per_A", "force MAE (meV/Å)"),
          ("stress_mae_mev_per_A3", "stress MAE (meV/Å^3)"))


def plot_curves(metrics: dict, filename) -> None:
    """The curves of ``metrics`` (metrics.json's content, with at least one epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = metrics["history"]
    epochs = [h["epoch"] for h in history]
    evaluated = metrics["evaluated_on"]
    named = {"valid": "validation", "train": "training"}.get(evaluated, evaluated)  # (the legend's words)
    panels = [(key, title) for key, title in PANELS if f"{evaluated}_{key}" in metrics]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.7 * (1 + len(panels)), 4.2))
    selected = metrics["selected_epoch"]
    losses = [h["train_loss"] for h in history]
    axes[0].plot(epochs, losses, marker="o", label="training")
    valid_losses = [(h["epoch"], h["valid_loss"]) for h in history if "valid_loss" in h]
    if valid_losses:
        line, = axes[0].plot(*zip(*valid_losses), marker="o", label="validation")
    if "zero_shot_valid_loss" in metrics:  # under the result's loss weights (dashed, as in the error panels)
        axes[0].axhline(metrics["zero_shot_valid_loss"], ls="--", color=line.get_color() if valid_losses else "gray",
                        label="validation, zero-shot")
        losses.append(metrics["zero_shot_valid_loss"])
    losses += [v for _, v in valid_losses]
    spans_decades = min(losses) > 0 and max(losses) > 10 * min(losses)
    axes[0].set(title="loss", xlabel="epoch", ylabel="loss (weighted sum of the error terms)",
                yscale="log" if spans_decades else "linear")
    for ax, (key, title) in zip(axes[1:], panels):
        valid = [(h["epoch"], h["valid"][key]) for h in history if key in h.get("valid", {})]  # (stress: if labelled)
        if valid:
            line, = ax.plot(*zip(*valid), marker="o", label="validation")
        # the validation errors' own baseline: the test set's is another set's, not what they improve on
        base_valid = metrics.get(f"zero_shot_valid_{key}") if valid and evaluated != "valid" else None
        if base_valid is not None:
            ax.axhline(base_valid, ls="--", color=line.get_color(), label="validation, zero-shot")
        ax.axhline(metrics[f"zero_shot_{evaluated}_{key}"], ls="--", color="gray", label=f"{named}, zero-shot")
        ax.plot([selected], [metrics[f"{evaluated}_{key}"]], marker="*", markersize=14, ls="", color="tab:red",
                label=f"{named}, fine-tuned" + (f" (epoch {selected}: {metrics['selected_by']})"
                                            if selected != epochs[-1] else ""))
        # headroom of the values, not of their spread (a few epochs barely move the errors)
        shown = [v for _, v in valid] + [metrics[f"zero_shot_{evaluated}_{key}"], metrics[f"{evaluated}_{key}"]]
        shown += [base_valid] if base_valid is not None else []
        ax.set(title=title, xlabel="epoch", ylim=(0, 1.08 * max(shown) or None))
    settings = metrics["settings"]
    for ax in axes:
        if settings["stage_two"]:  # its loss weights differ: the training loss jumps there
            ax.axvline(settings["start_stage_two"] + 0.5, ls=":", color="tab:purple", label="Stage Two from here")
        ax.legend(fontsize=8)
        ax.set_xticks(epochs if len(epochs) <= 12 else ax.get_xticks())
    fig.suptitle(f"{metrics['method']} fine-tuning of {Path(metrics['model']).name}: "
                 f"{100 * metrics['changed_fraction']:.2f} % of the path weights changed", fontsize=10)
    fig.tight_layout()
    fig.savefig(filename, format="png", dpi=110)
    plt.close(fig)
