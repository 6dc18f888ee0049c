"""The magnetic energy fitted in closed form (``magnetism/fit.py``) by the trainer, at
the start of a run and again after the last epoch (on the trained base): the energy
and stress residuals of the model with E_mag at zero and the magnetic-force labels of this
process's share of the training frames (at their weights), the normal equations summed
over the processes and solved alike on each."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..magnetism.family import MagneticFamily
from ..magnetism.fit import normal_equations, prior_rows, prior_weight, solve, zero_outputs
from ..magnetism.loss import labelled_count
from .evaluation import Sample, evaluation_size, outputs, shared_batches
from .weights import entry_weights, weighted


def fit_magnetic_energy(family, model, samples: Sequence[Sample], settings, group) -> Optional[dict]:
    """What the fit chose (``solve``); None without magnetism."""
    if not isinstance(family, MagneticFamily):
        return None
    zero_outputs(model.energy)

    def parts():  # this process's batches, and where each starts
        for i, batch in shared_batches(samples, evaluation_size(settings), group):
            out = outputs(family, model, batch, settings.device, training=False)
            reference = torch.tensor([s.energy for s in batch], dtype=torch.float64)
            targets = {"energy": reference - out["energy"].detach().cpu().double(),
                       "forces": torch.cat([s.forces for s in batch]).double() - out["forces"].detach().cpu().double()}
            if all(s.magforces is not None for s in batch):
                targets["magforces"] = torch.cat([s.magforces for s in batch])
            if "stress" in out:  # (some frame of the batch has a label; NaN: this one has none)
                labels = torch.stack([s.stress if s.stress is not None else torch.full((3, 3), torch.nan)
                                      for s in batch]).double()
                targets["stress"] = labels - out["stress"].detach().cpu().double()
            weights = {k: entry_weights(batch, k, labelled=False) for k in targets} if weighted(batch) else {}
            graphs = family.magnetic_batch([s.graph for s in batch], settings.device)
            yield graphs, targets, i * evaluation_size(settings), weights

    model.eval()
    weights = {"energy": settings.energy_weight, "forces": settings.forces_weight,
               "magforces": settings.magforces_weight, "stress": settings.stress_weight}
    counts = {"energy": len(samples), "forces": 3 * sum(s.natoms for s in samples),
              "magforces": sum(labelled_count(s.magforces) for s in samples if s.magforces is not None),
              "stress": 9 * sum(s.stress is not None for s in samples), "strain": prior_rows(len(samples))}
    weights["strain"] = prior_weight(weights)
    return solve(model.energy, group.sum(normal_equations(model.energy, parts(), counts)), weights)
