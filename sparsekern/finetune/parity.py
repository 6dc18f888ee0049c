"""The evaluated set's (the test set's, else the validation or training set's)
predictions against its labels, before and after fine-tuning, as a
picture (``parity.png`` beside metrics.json): energies per atom, force components and,
with stress labels, stress components."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch

# per quantity: the panel's title, and the MAE's unit (the metrics' milli-units)
UNITS = {"energy": ("energy (eV/atom)", "meV/atom"), "forces": ("force components (eV/Å)", "meV/Å"),
         "stress": ("stress components (eV/Å^3)", "meV/Å^3")}


def parity_data(samples: Sequence, before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]
                ) -> Dict[str, tuple]:
    """Per quantity: (labels, zero-shot predictions, fine-tuned ones) as flat arrays, from
    the evaluated samples and their residuals (``evaluation.residuals``) before and after;
    as the errors count them, without the entries that weigh 0 (a quantity with no other
    entries: left out)."""
    labels = {"energy": np.array([s.energy / s.natoms for s in samples]),
              "forces": torch.cat([s.forces.reshape(-1) for s in samples]).double().numpy()}
    stressed = [s.stress.reshape(-1) for s in samples if s.stress is not None]
    if stressed and "stress" in before:
        labels["stress"] = torch.cat(stressed).double().numpy()
    data = {}
    for k, ref in labels.items():
        kept = (before[f"{k}_weights"] > 0).numpy() if f"{k}_weights" in before else np.ones(len(ref), dtype=bool)
        if kept.any():
            data[k] = (ref[kept], (ref + before[k].numpy())[kept], (ref + after[k].numpy())[kept])
    return data


def plot_parity(data: Dict[str, tuple], title: str, filename) -> None:
    """One panel per quantity of ``data`` (``parity_data``): predicted against label, the
    base model grey, the fine-tuned one in colour, with MAEs in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(data), figsize=(4.6 * len(data), 4.4), squeeze=False)
    for ax, (key, (ref, before, after)) in zip(axes[0], data.items()):
        size = 12 if ref.size < 500 else 3
        for pred, colour, label in ((before, "0.6", "zero-shot"), (after, "tab:blue", "fine-tuned")):
            ax.scatter(ref, pred, s=size, c=colour, alpha=0.7, lw=0, rasterized=True,
                       label=f"{label}, MAE {1e3 * np.abs(pred - ref).mean():.3g} {UNITS[key][1]}")
        lo, hi = (f(np.concatenate([ref, before, after])) for f in (np.min, np.max))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ax.set(title=UNITS[key][0], xlabel="label", ylabel="predicted")
        for axis in (ax.xaxis, ax.yaxis):  # (energies close together have long labels: six ran into each other)
            axis.set_major_locator(MaxNLocator(4))
        ax.legend(fontsize=8, loc="best")  # (upper left hides what the model over-predicts)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(filename, format="png", dpi=110)
    plt.close(fig)
