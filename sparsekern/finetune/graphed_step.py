"""Training steps replayed from CUDA graphs (``--cuda_graphs``): the forward, the loss and
the backward into the trained tensors of a step captured once and replayed on each
batch, the optimizer and everything after it eager as before; evaluation batches of the
frozen model alike (captured anew after the weights change).

A patched model's step reads nothing back to the host (the sync proxy), yet eager it
waits on its host: a sparse MACE-MP-0 step issues about 1,100 aten ops and their
autograd nodes, whatever the batch's size (benchmarks/NOTES.md). A graph replays one
shape, so each batch is padded to capacities of atoms and edges (the family's
``padder``: padding atoms in a graph of their own, padding edges that reach nothing
real; the loss weighs them 0, by graph and by atom, stress and magnetic terms
included), and one graph is kept per number of frames, dtype and the loss's terms; a
batch larger than the capacities captures anew with headroom. What the replay does not
run is the host's part of the step: the density schedule's step count is kept here, and
steps whose target density still moves (warmup, anneal) run eagerly, since a replay
calibrates to the density it was captured with."""

from __future__ import annotations

import weakref
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..integrations import Family, cuda_graphs
from ..magnetism.loss import KEYS as MAGNETIC, magnetic_labels, magnetic_weights
from .density import schedule_step, set_schedule_step, steady
from .penalty import delta, force_delta, penalty
from .stress import value_weight, wanted as stress_wanted
from .weights import entry_weights, weighted


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

    def predict(self, share: List) -> Optional[Dict[str, torch.Tensor]]:
        """The family's outputs (energy per frame, forces, ...) of the frozen model on an
        evaluation batch; None
        where a parameter asks for a gradient (run it eagerly). Captured anew once the
        weights have changed (``cuda_graphs.State``)."""
        if any(p.requires_grad for p in self.model.parameters()):
            return None
        stress = stress_wanted(share)
        out, (n, g) = self._replayed("predict, stress" if stress else "predict", share, {},
                                     lambda inputs: self._predict(inputs, stress), cuda_graphs.State(self.model))
        return {k: (v[:g] if k in PER_GRAPH else v[:n]).clone() for k, v in out.items()}

    def _replayed(self, what: str, share: List, labels: dict, compute, state: Optional[cuda_graphs.State] = None
                  ) -> Tuple[dict, Tuple[int, int]]:
        """``compute`` on ``share``'s inputs and ``labels`` padded (collated and padded on
        the host: a replay's device work is one copy per input), replayed from the graph
        kept for (``what``, frames, dtype, the loss's terms) and ``state``, captured for larger capacities
        where needed; on the CPU, or where the capture failed, eagerly. Also the frames'
        atoms and count."""
        first = next(self.model.parameters())
        device, dtype = first.device, first.dtype
        (n, g, *edges), pad = self.padding(self.family.collate([s.graph for s in share], "cpu"))
        # atoms (with the padding atoms the first list's padding edges spread over), then edges of each list
        sizes = (n + cuda_graphs.padding_atoms(n, edges[0], cuda_graphs.capacity(edges[0], self.replays.headroom)),
                 *edges)

        def padded(atoms: int, *edges: int) -> dict:
            return {**pad(atoms, *edges), **_padded_labels(labels, atoms)}

        def on_device(inputs: dict) -> dict:
            return {k: v.to(device) for k, v in inputs.items()}

        if not cuda_graphs.replayable(device):
            return compute(on_device(padded(*(cuda_graphs.capacity(s, self.replays.headroom) for s in sizes)))), (n, g)
        captured = self.replays.get((what, g, dtype, tuple(labels)), sizes, lambda capacities, pool: _CapturedStep(
            compute, on_device(padded(*capacities)), capacities, pool), state)
        if captured is None:
            return compute(on_device(padded(*sizes))), (n, g)
        return captured(padded(*captured.sizes)), (n, g)

    def _predict(self, inputs: dict, stress: bool) -> dict:
        return {k: v.detach() for k, v in self.family.run(self.model, inputs, False, stress).items()}

    def _compute(self, inputs: dict) -> dict:
        """The step on padded inputs: its loss and the wanted tensors' gradients (by
        position; absent: none)."""
        stress = inputs.get(f"stress{_LABELS}")  # per graph: (weight, 9 values)
        out = self.family.run(self.model, {k: v for k, v in inputs.items() if not k.endswith(_LABELS)}, True,
                              stress is not None)
        per_graph = inputs["graph_labels"]  # see _labels
        residual = (out["energy"] + per_graph[1] - per_graph[2]) / per_graph[3]
        huber = delta(self.settings)
        loss = (per_graph[0] * penalty(residual, huber)).sum()
        if stress is not None:
            residual = out["stress"].reshape(len(stress), 9) - stress[:, 1:]
            loss = loss + (stress[:, 0] * penalty(residual, huber).sum(1)).sum()
        for key in ("forces", *MAGNETIC):  # per atom: (weight, label) of each component
            labels = inputs.get(f"{key}{_LABELS}")
            if labels is not None and key in out:
                weight, label = labels.chunk(2, dim=1)
                residual = out[key].reshape(label.shape) - label
                loss = loss + (weight * penalty(residual, inputs.get(f"{key}_delta{_LABELS}", huber))).sum()
        grads = torch.autograd.grad(loss, self.wanted, allow_unused=True)
        return {"loss": loss.detach(), **{i: g for i, g in enumerate(grads) if g is not None}}


_LABELS = "_labels"  # the suffix of the loss's inputs
PER_GRAPH = ("energy", "stress")  # outputs by graph (the others by atom)
_BY_MODEL: "weakref.WeakKeyDictionary[torch.nn.Module, GraphedSteps]" = weakref.WeakKeyDictionary()


def _labels(share: List, whole: Sequence, weight: float, settings, dtype: torch.dtype) -> dict:
    """The loss's terms, on the host: by graph (weight, energy shift, reference energy,
    atoms), with the padding graph's (weight 0, 1 atom), and (weight, stress label) where
    frames have stress labels (weight 0 for the others); by atom (weight, label) for the
    forces and each magnetic term the samples have labels for, of each component (weight
    0 where ``magnetic_labels`` leave one unlabelled), each at its frame's weight:
    ``evaluation.loss``'s sums over ``share`` divided by counts of ``whole``."""
    per_graph = torch.tensor([[settings.energy_weight * weight / len(whole) * s.weights.get("energy", 1.0)
                               for s in share] + [0.0],
                              [s.shift for s in share] + [0.0], [s.energy for s in share] + [0.0],
                              [s.natoms for s in share] + [1]], dtype=torch.float64)
    weights = {"forces": settings.forces_weight / (3 * sum(s.natoms for s in whole)),
               **magnetic_weights(share, settings, whole)}
    per_atom = {"forces": lambda s: s.forces, **{key: partial(_per_atom, key) for key in MAGNETIC}}
    labels = {"graph_labels": per_graph.to(dtype)}
    if stress_wanted(share):
        w = value_weight(settings, whole) * weight
        rows = [[w * s.weights.get("stress", 1.0), *s.stress.reshape(-1).tolist()] if s.stress is not None
                else [0.0] * 10 for s in share]
        labels[f"stress{_LABELS}"] = torch.tensor(rows + [[0.0] * 10], dtype=torch.float64).to(dtype)
    for key, w in weights.items():
        label = torch.cat([per_atom[key](s) for s in share]).double()
        labelled = label.isfinite().double()  # (float64: weight is a float, bool * float makes float32)
        if weighted(share):
            labelled = labelled * entry_weights(share, key, labelled=False).reshape(label.shape)
        labels[f"{key}{_LABELS}"] = torch.cat([labelled * (w * weight), label.nan_to_num(0.0)], 1).to(dtype)
    if settings.loss == "universal":  # the forces' Huber deltas by component (padding atoms: 0)
        deltas = [force_delta(settings, s.forces.double()) for s in share]
        labels[f"forces_delta{_LABELS}"] = torch.cat(deltas).to(dtype)
    return labels


def _per_atom(key: str, sample) -> torch.Tensor:
    """A magnetic output's labels of ``sample`` by atom (NaN: not labelled)."""
    return magnetic_labels(key, sample).reshape(sample.natoms, -1)


def _padded_labels(labels: dict, atoms: int) -> dict:
    """The labels, the atoms' padded with zeros (weight 0) to ``atoms``."""
    return {key: value if key in _BY_GRAPH else torch.cat([value, value.new_zeros(atoms - len(value), value.shape[1])])
            for key, value in labels.items()}


_BY_GRAPH = ("graph_labels", f"stress{_LABELS}")  # labels of the frames and the padding graph


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
