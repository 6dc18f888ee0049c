"""The magnetic energy fitted in closed form (``magnetism/fit.py``) by the trainer, at
the start of a run and again after the last epoch (on the trained base): the energy
residuals of the model with E_mag at zero and the magnetic-force labels of this
process's share of the training frames, the normal equations summed over the processes
and solved alike on each."""

from __future__ import annotations

from typing import Sequence

import torch

from ..magnetism.family import MagneticFamily
from ..magnetism.fit import normal_equations, solve, zero_outputs
from .evaluation import Sample, batches, outputs


def fit_magnetic_energy(family, model, samples: Sequence[Sample], settings, group) -> None:
    if not isinstance(family, MagneticFamily):
        return
    zero_outputs(model.energy)

    def parts():
        for batch in batches(group.share(samples), settings.batch_size):
            predicted = outputs(family, model, batch, settings.device, training=False)["energy"]
            reference = torch.tensor([s.energy for s in batch], dtype=torch.float64)
            labels = (torch.cat([s.magforces for s in batch])
                      if all(s.magforces is not None for s in batch) else None)
            yield (family.magnetic_batch([s.graph for s in batch], settings.device),
                   reference - predicted.detach().cpu().double(), labels)

    model.eval()
    n_magforces = sum(s.magforces.numel() for s in samples if s.magforces is not None)
    system = normal_equations(model.energy, parts(), settings.energy_weight, settings.magforces_weight,
                              len(samples), n_magforces)
    solve(model.energy, group.sum(system))
