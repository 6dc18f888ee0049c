"""The pictures: the test set's parity plot (labels against predictions, before and after), the learning curves."""

import numpy as np
import pytest
import torch

from sparsekern.finetune.evaluation import Sample
from sparsekern.finetune.parity import parity_data, plot_parity


def test_parity_data_are_the_labels_and_the_predictions(tmp_path):
    samples = [Sample(None, -8.0, torch.ones(2, 3), 2, stress=torch.eye(3)), Sample(None, -3.0, torch.zeros(1, 3), 1)]
    before = {"energy": torch.tensor([0.5, -1.0]), "forces": torch.arange(9.0), "stress": torch.full((9,), 2.0)}
    after = {k: v / 10 for k, v in before.items()}
    data = parity_data(samples, before, after)
    ref, zero_shot, tuned = data["energy"]
    assert np.allclose(ref, [-4.0, -3.0]) and np.allclose(zero_shot, [-3.5, -4.0]) and np.allclose(tuned, [-3.95, -3.1])
    ref, zero_shot, tuned = data["forces"]
    assert np.allclose(ref, [1.0] * 6 + [0.0] * 3) and np.allclose(tuned - ref, np.arange(9.0) / 10)
    ref, zero_shot, _ = data["stress"]  # only the labelled frame's
    assert np.allclose(ref, np.eye(3).reshape(-1)) and np.allclose(zero_shot - ref, 2.0)
    unlabelled = {"energy": torch.zeros(1), "forces": torch.zeros(3)}
    assert set(parity_data(samples[1:], unlabelled, unlabelled)) == {"energy", "forces"}
    plot_parity(data, "a title", tmp_path / "parity.png")
    assert (tmp_path / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _saved_figures(monkeypatch) -> list:
    from matplotlib.figure import Figure

    saved, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), save(fig, *a, **k))[1])
    return saved


def test_parity_tick_labels_do_not_overlap(tmp_path, monkeypatch):
    """Energies per atom that differ in the fourth decimal (a NiO test set: -5.1969 to
    -5.1958 eV/atom): the tick labels stay apart (six of them ran into each other)."""
    figures = _saved_figures(monkeypatch)
    ref = np.array([-5.19692, -5.19641, -5.19613, -5.19577])
    data = {"energy": (ref, ref - 5e-4 + np.array([3e-4, -2e-4, 0, 1e-4]), ref - 6e-4),
            "forces": (np.linspace(-0.4, 0.6, 50), np.linspace(-0.4, 0.6, 50) * 0.9, np.linspace(-0.4, 0.6, 50))}
    plot_parity(data, "a title", tmp_path / "parity.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figures[-1]).get_renderer()  # (closed once saved)
    for ax in figures[-1].axes:
        boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()),
                       key=lambda b: b.x0)
        assert len(boxes) >= 3 and all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), ax.get_title()


def test_curves_where_the_validation_frames_have_no_stresses(tmp_path):
    """The evaluated set has stress labels and the validation frames none (a split of
    mixed data): the stress panel shows the evaluated set's alone (it raised KeyError,
    after training, before metrics.json was written)."""
    from sparsekern.finetune.curves import plot_curves

    errors = {"energy_mae_mev_per_atom": 2.0, "force_mae_mev_per_A": 30.0}
    evaluated = {**errors, "stress_mae_mev_per_A3": 4.0}
    metrics = {"history": [{"epoch": e, "train_loss": 1.0 / e, "valid_loss": 0.5 / e, "valid": errors} for e in (1, 2)],
               "evaluated_on": "test", "selected_epoch": 2, "selected_by": "lowest validation loss",
               "settings": {"stage_two": False}, "method": "sparse", "model": "m.model", "changed_fraction": 0.03,
               **{f"{prefix}{k}": v for k, v in evaluated.items() for prefix in ("test_", "zero_shot_test_")}}
    plot_curves(metrics, tmp_path / "training.png")
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def saved(monkeypatch):
    """The figures saved while the test runs (their axes kept past plt.close)."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def seen(fig, *args, **kwargs):
        figures.append(fig)
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", seen)
    return figures


def test_curves_leave_headroom_above_flat_errors(tmp_path, saved):
    """Errors that barely move over a few epochs: each error panel's top lies clear of
    the highest value (its autoscaled top, frozen by a bottom of 0, sat on the zero-shot
    line and cut the fine-tuned star); the legend names the evaluated set in words; the
    loss panel's y-axis says it is the loss."""
    from sparsekern.finetune.curves import plot_curves

    errors = {"energy_mae_mev_per_atom": 56.53, "force_mae_mev_per_A": 120.02}
    metrics = {"history": [{"epoch": e, "train_loss": 1.0, "valid_loss": 0.5, "valid": errors} for e in (1, 2)],
               "evaluated_on": "valid", "selected_epoch": 2, "selected_by": "lowest validation loss",
               "settings": {"stage_two": False}, "method": "sparse", "model": "m.model", "changed_fraction": 0.03,
               "valid_energy_mae_mev_per_atom": 56.5, "zero_shot_valid_energy_mae_mev_per_atom": 56.549,
               "valid_force_mae_mev_per_A": 120.0, "zero_shot_valid_force_mae_mev_per_A": 120.04}
    plot_curves(metrics, tmp_path / "training.png")
    assert [ax.get_ylim()[1] for ax in saved[0].axes[1:]] == [pytest.approx(1.08 * 56.549),
                                                              pytest.approx(1.08 * 120.04)]
    labels = [t.get_text() for t in saved[0].axes[1].get_legend().get_texts()]
    assert labels.count("validation, zero-shot") == 1  # (the legend's words, not metrics.json's prefixes)
    assert saved[0].axes[0].get_ylabel().startswith("loss")  # (the loss panel's axis said nothing)


def test_curves_set_the_validation_errors_beside_the_base_models(tmp_path, saved):
    """With test frames, each error panel draws the base model's validation errors (the
    validation curve's baseline) beside the test set's zero-shot line: against the latter
    alone, validation errors above the base's (here every epoch's) looked like gains."""
    from sparsekern.finetune.curves import plot_curves

    base = {"energy_mae_mev_per_atom": 10.1, "force_mae_mev_per_A": 52.9, "stress_mae_mev_per_A3": 1.5}
    history = [{"epoch": e, "train_loss": 1.0, "valid_loss": 0.5, "valid": {k: v + e for k, v in base.items()}}
               for e in (1, 2)]
    metrics = {"history": history, "evaluated_on": "test", "selected_epoch": 2, "selected_by": "lowest validation loss",
               "settings": {"stage_two": False}, "method": "sparse", "model": "m.model", "changed_fraction": 0.03,
               **{f"zero_shot_valid_{k}": v for k, v in base.items()},
               **{f"{prefix}{k}": 8 * v for k, v in base.items() for prefix in ("test_", "zero_shot_test_")}}
    plot_curves(metrics, tmp_path / "training.png")
    panels = saved[0].axes[1:]
    assert len(panels) == len(base)
    for ax, (key, want) in zip(panels, base.items()):
        lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
        assert list(lines["validation, zero-shot"]) == [want, want], key
        assert list(lines["test, zero-shot"]) == [8 * want] * 2, key
