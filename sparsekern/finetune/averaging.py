"""An exponential moving average of the trained parameters (MACE's ``--ema``, with
torch_ema's decay: ``min(decay, (1 + n) / (10 + n))`` after n updates, so a run of a
few hundred steps averages over about its last epoch, not its start). Validation, the
test and the saved model use the average; the checkpoint keeps the trained parameters
and the average apart, so a resumed run continues both. On by default in ``sparsekern
finetune`` (``--no_ema`` turns it off): 2-5 % lower test force errors for every method on
the molecules of the accuracy benchmark, and it lets a 0.5 % delta train at twice the lr
(benchmarks/NOTES.md, sixth and seventh rounds)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable

import torch


class ParameterAverage:
    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @contextmanager
    def applied(self):
        """The parameters hold the average inside the block, the trained values after it."""
        trained = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    p.copy_(t)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        shapes = [tuple(s.shape) for s in state["shadow"]]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise ValueError("the checkpoint's parameter average does not match the model's trained parameters")
        self.updates = state["updates"]
        self.shadow = [s.to(p) for s, p in zip(state["shadow"], self.params)]
