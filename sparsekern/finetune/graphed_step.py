"""Training steps replayed from CUDA graphs (``--cuda_graphs``): the forward, the loss and
the backward into the trained tensors of a step captured once and replayed on each
batch, the optimizer and everything after it eager as before; evaluation batches of the
frozen model alike (captured anew after the weights change).

A patched model's step reads nothing back to the host (the sync proxy), yet eager it
waits on its host: a sparse MACE-MP-0 step issues about 1,100 aten ops and their
autograd nodes, whatever the batch's size (benchmarks/NOTES.md). A graph replays one
shape, so each batch is padded to capacities of atoms and edges (the family's
``padder``: padding atoms in a graph of their own, padding edges that reach nothing
real; the loss weighs them 0), and one graph is kept per number of frames and dtype; a
batch larger than the capacities captures anew with headroom. What the replay does not
run is the host's part of the step: the density schedule's step count is kept here, and
steps whose target density still moves (warmup, anneal) run eagerly, since a replay
calibrates to the density it was captured with."""

from __future__ import annotations

import weakref
from typing import List, Optional, Sequence, Tuple

import torch

from ..integrations import Family, cuda_graphs
from .density import schedule_step, set_schedule_step, steady


def graphed(family: Family, model: torch.nn.Module, settings) -> Optional["GraphedSteps"]:
    """The model's GraphedSteps under ``--cuda_graphs`` (one per model, kept while it
    lives: training and every evaluation share its captures), else None."""
    if not getattr(settings, "cuda_graphs", False):
        return None
    if model not in _BY_MODEL:
        _BY_MODEL[model] = GraphedSteps(family, model, settings)
    return _BY_MODEL[model]


class GraphedSteps:
    """The captured training steps and evaluation calls of one model and loss
    (``settings``: the trainer's Settings). On the CPU each runs padded, eagerly (how
    the tests check the padding)."""

    def __init__(self, family: Family, model: torch.nn.Module, settings, headroom: float = 0.1) -> None:
        padding = family.padder(model)
        if padding is None:
            raise ValueError(f"--cuda_graphs: {family.name} models have no padded training step")
        self.family, self.settings, self.padding = family, settings, padding
        self._model = weakref.ref(model)  # (kept by the model's entry in _BY_MODEL: no reference back)
        self.replays = cuda_graphs.Replays("--cuda_graphs", headroom)
        self.wanted: tuple = ()

    @property
    def model(self) -> torch.nn.Module:
        return self._model()

    def loss(self, share: List, whole: Sequence, weight: float, trained: Sequence[torch.Tensor]
             ) -> Optional[torch.Tensor]:
        """The loss of ``share`` as its part of ``whole``'s, times ``weight`` (as
        ``evaluation.loss``), with the gradients of ``trained`` set (those that ask for
        one); None where this step must run eagerly (the density still moves)."""
        if not steady(self.model):
            return None
        wanted = tuple(t for t in trained if t.requires_grad)
        if wanted != self.wanted:  # other tensors trained (--fast_after): the graphs computed others'
            self.replays.graphs.clear()
            self.wanted = wanted
        step = schedule_step(self.model)
        labels = _labels(share, whole, weight, self.settings, wanted[0].dtype)
        out, _ = self._replayed("step", share, labels, self._compute)
        set_schedule_step(self.model, step + 1)  # a replay runs no hook: the step counted here
        for i, t in enumerate(wanted):
            t.grad = out.get(i)
        return out["loss"]

    def predict(self, share: List) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(energy per frame, forces) of the frozen model on an evaluation batch; None
        where a parameter asks for a gradient (run it eagerly). Captured anew once the
        weights have changed (``cuda_graphs.State``)."""
        if any(p.requires_grad for p in self.model.parameters()):
            return None
        out, (n, g) = self._replayed("predict", share, {}, self._predict, cuda_graphs.State(self.model))
        return out["energy"][:g].clone(), out["forces"][:n].clone()

    def _replayed(self, what: str, share: List, labels: dict, compute, state: Optional[cuda_graphs.State] = None
                  ) -> Tuple[dict, Tuple[int, int]]:
        """``compute`` on ``share``'s inputs and ``labels`` padded (collated and padded on
        the host: a replay's device work is one copy per input), replayed from the graph
        kept for (``what``, frames, dtype) and ``state``, captured for larger capacities
        where needed; on the CPU, or where the capture failed, eagerly. Also the frames'
        atoms and count."""
        first = next(self.model.parameters())
        device, dtype = first.device, first.dtype
        (n, g, e), pad = self.padding(self.family.collate([s.graph for s in share], "cpu"))

        def padded(atoms: int, edges: int) -> dict:
            return {**pad(atoms, edges), **_padded_labels(labels, atoms)}

        def on_device(inputs: dict) -> dict:
            return {k: v.to(device) for k, v in inputs.items()}

        if not cuda_graphs.replayable(device):
            return compute(on_device(padded(*(cuda_graphs.capacity(s, self.replays.headroom) for s in (n + 2, e))))), (n, g)
        captured = self.replays.get((what, g, dtype), (n + 2, e), lambda sizes, pool: _CapturedStep(
            compute, on_device(padded(*sizes)), sizes, pool), state)
        if captured is None:
            return compute(on_device(padded(n + 2, e))), (n, g)
        return captured(padded(*captured.sizes)), (n, g)

    def _predict(self, inputs: dict) -> dict:
        energy, forces = self.family.run(self.model, inputs, False)
        return {"energy": energy.detach(), "forces": forces.detach()}

    def _compute(self, inputs: dict) -> dict:
        """The step on padded inputs: its loss and the wanted tensors' gradients (by
        position; absent: none)."""
        energy, forces = self.family.run(self.model, {k: v for k, v in inputs.items() if k not in _LABELS}, True)
        per_graph, per_atom = inputs["graph_labels"], inputs["atom_labels"]  # see _labels
        residual = (energy + per_graph[1] - per_graph[2]) / per_graph[3]
        forces_term = per_atom[:, 0] * (forces - per_atom[:, 1:]).square().sum(1)
        loss = (per_graph[0] * residual.square()).sum() + forces_term.sum()
        grads = torch.autograd.grad(loss, self.wanted, allow_unused=True)
        return {"loss": loss.detach(), **{i: g for i, g in enumerate(grads) if g is not None}}


_LABELS = ("graph_labels", "atom_labels")
_BY_MODEL: "weakref.WeakKeyDictionary[torch.nn.Module, GraphedSteps]" = weakref.WeakKeyDictionary()


def _labels(share: List, whole: Sequence, weight: float, settings, dtype: torch.dtype) -> dict:
    """The loss's terms by graph (weight, energy shift, reference energy, atoms) and by
    atom (weight, reference force), with the padding graph's (weight 0, 1 atom), on the
    host: ``evaluation.loss``'s sums over ``share`` divided by counts of ``whole``."""
    per_graph = torch.tensor([[settings.energy_weight * weight / len(whole)] * len(share) + [0.0],
                              [s.shift for s in share] + [0.0], [s.energy for s in share] + [0.0],
                              [s.natoms for s in share] + [1]], dtype=torch.float64)
    forces = torch.cat([s.forces for s in share]).double()
    w = forces.new_full((forces.shape[0], 1), settings.forces_weight * weight / (3 * sum(s.natoms for s in whole)))
    return {"graph_labels": per_graph.to(dtype), "atom_labels": torch.cat([w, forces], 1).to(dtype)}


def _padded_labels(labels: dict, atoms: int) -> dict:
    """The labels (if any), the atoms' padded with zeros (weight 0) to ``atoms``."""
    if not labels:
        return {}
    per_atom = labels["atom_labels"]
    padding = per_atom.new_zeros(atoms - per_atom.shape[0], per_atom.shape[1])
    return {"graph_labels": labels["graph_labels"], "atom_labels": torch.cat([per_atom, padding])}


class _CapturedStep:
    """``compute`` captured on ``static`` (padded to ``sizes``: atoms, edges); a call
    copies a batch's padded inputs (same shapes, on the host) into it and replays."""

    def __init__(self, compute, static: dict, sizes: tuple, pool) -> None:
        self.static, self.sizes = static, sizes
        self.graph, self.out = cuda_graphs.capture(lambda: compute(dict(self.static)), pool)

    def __call__(self, inputs: dict) -> dict:
        with torch.no_grad():
            for key, value in inputs.items():  # host to device, one copy each
                self.static[key].copy_(value)
        self.graph.replay()
        return self.out
