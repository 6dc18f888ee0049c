"""A SevenNet model whose inference calls replay CUDA graphs: for molecular dynamics
(:mod:`..cuda_graphs` says why). A patched SevenNet reads nothing back to the
host (:mod:`.sync_free`), so its energy, forces and stress can be captured. Each call
runs batched (its structures' graphs, one for the calculator's single structure) and
padded to an edge capacity: padding atoms of the call's first atom's element in a
graph of their own, and padding edges within their pairs, of length the cutoff (where
SevenNet's XPLOR envelope and its slope are zero); nothing reaches the real atoms or
graphs. One graph per (atoms, graphs, batched, dtype, edge capacity).

SevenNet's calculator takes only SevenNet's own model class, so ``GraphedSevenNet(model)``
turns ``model`` itself into one (its class swapped, as patching works in place) and
returns it. A multi-fidelity model's calls name their modality (``KEY.DATA_MODALITY``,
as its calculator's ``modal`` does): mapped to its index before the graph, which takes
the index as an input. Training runs eagerly, and so does a call whose capture fails (said once in a
warning); every call on the CPU runs padded, eagerly (how the tests check the padding).
Replayed results are copies, detached: no gradient reaches the parameters through a
replay."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional

import torch
from sevenn import _keys as KEY
from sevenn.nn.sequential import AtomGraphSequential

from .. import cuda_graphs
from . import sync_free

# the inputs a call copies into its graph: per atom, per graph (batched), per edge
_ATOM_KEYS = (KEY.POS, KEY.ATOMIC_NUMBERS, KEY.NODE_FEATURE, KEY.NODE_ATTR, KEY.BATCH)
_GRAPH_KEYS = (KEY.NUM_ATOMS, KEY.CELL_VOLUME)
_EDGE_DIMS = {KEY.EDGE_IDX: 1, KEY.EDGE_VEC: 0}
_INPUTS = (*_ATOM_KEYS, *_GRAPH_KEYS, *_EDGE_DIMS)
# the outputs: per graph, per edge by name, per atom by their rows
_PER_GRAPH = {KEY.PRED_TOTAL_ENERGY, KEY.PRED_STRESS}
_PER_EDGE = {KEY.EDGE_LENGTH, KEY.EDGE_EMBEDDING, KEY.EDGE_ATTR}


class GraphedSevenNet(AtomGraphSequential):
    """``SevenNetCalculator(model=GraphedSevenNet(model), file_type="model_instance",
    device="cuda")``: ``model`` (a SevenNet ``AtomGraphSequential``, patched) replaying
    padded CUDA graphs, batched calls and the calculator's alike."""

    def __new__(cls, model: AtomGraphSequential = None, headroom: float = 0.1):
        if model is None:  # copy and pickle rebuild through here
            return super().__new__(cls)
        if type(model) not in (AtomGraphSequential, cls):
            raise TypeError(f"GraphedSevenNet takes a SevenNet AtomGraphSequential, got {type(model).__name__}")
        if "modal_input_prepare" in model._modules:
            raise ValueError("GraphedSevenNet: the model was deployed at one modality (sevenn's prepare_modal_deploy), "
                             "which runs one graph at a time; give the model before it (each call names its modality)")
        model.__class__ = cls
        return model

    def __init__(self, model: AtomGraphSequential = None, headroom: float = 0.1) -> None:
        # not AtomGraphSequential's: the model is built; only the graphs are new
        self.replays = cuda_graphs.Replays("GraphedSevenNet", headroom)
        sync_free.swap(self)  # as patching does: a call that reads back cannot be captured

    def forward(self, data):
        if self.training:
            return super().forward(data)
        batched = self.is_batch_data
        missing = [k for k in (KEY.EDGE_IDX, KEY.EDGE_VEC, KEY.POS, *_GRAPH_KEYS) + ((KEY.BATCH,) if batched else ())
                   + ((KEY.DATA_MODALITY,) if self.eval_modal_map else ()) if k not in data]
        if missing:
            raise ValueError(f"GraphedSevenNet: the input lacks {missing} (a SevenNet AtomGraphData has them)")
        inputs = _inputs(data, batched, self.modal_map if self.eval_modal_map else None)
        n, g, e = inputs[KEY.POS].shape[0], inputs[KEY.NUM_ATOMS].shape[0], inputs[KEY.EDGE_IDX].shape[1]

        def pad(inputs, edges):  # the padding atoms of this call's edges
            return _pad(inputs, edges, self.cutoff, n + cuda_graphs.padding_atoms(n, e, edges))

        if not cuda_graphs.replayable(inputs[KEY.POS].device):
            padded = pad(inputs, cuda_graphs.capacity(e, self.replays.headroom))
            out = self._padded_forward(padded)
        else:
            key = (n, g, batched, inputs[KEY.POS].dtype)
            captured = self.replays.get(key, (e,), lambda edges, pool: cuda_graphs.Captured(
                self._padded_forward, pad, inputs, edges[0], _EDGE_DIMS, pool), cuda_graphs.State(self))
            if captured is None:
                return super().forward(data)
            out, padded = captured(inputs), captured.static
        for key, value in _real(out, n, g, e, batched, padded[KEY.POS].shape[0]).items():
            data[key] = value  # as SevenNet's forward: written into its input, which it returns
        return data

    def _padded_forward(self, padded: dict) -> dict:
        """SevenNet's forward on a padded batch (batched whatever the caller's mode)."""
        caller = self.is_batch_data
        self.set_is_batch_data(True)
        try:
            with modality_given(self, padded):
                return super().forward(padded)
        finally:
            self.set_is_batch_data(caller)


@contextmanager
def modality_given(model: AtomGraphSequential, inputs):
    """A multi-fidelity ``model``'s forward on ``inputs`` that carry each graph's modality
    index already (``_inputs``'): the model does not map names to it again."""
    mapped = model.eval_modal_map
    model.eval_modal_map = mapped and KEY.MODAL_TYPE not in inputs
    try:
        yield
    finally:
        model.eval_modal_map = mapped


def _inputs(data, batched: bool, modal_map: Optional[Dict[str, int]]) -> dict:
    """The call's inputs of its graph, batched: a single structure's graph keys as one
    graph's (its atoms' graph index, all 0, is left to :func:`_pad`: a capture keeps it);
    with a multi-fidelity model's ``modal_map``, each graph's modality index."""
    inputs = {k: data[k] for k in _INPUTS if k in data}
    if modal_map is not None:
        named = data[KEY.DATA_MODALITY]
        named = [named] if isinstance(named, str) else list(named)
        unknown = sorted(set(named) - set(modal_map))
        if unknown:
            raise ValueError(f"GraphedSevenNet: modality {unknown[0]!r} is not one of the model's "
                             f"({', '.join(sorted(modal_map))})")
        inputs[KEY.MODAL_TYPE] = torch.tensor([modal_map[m] for m in named], device=inputs[KEY.POS].device)
    if not batched:
        for key in _GRAPH_KEYS:
            inputs[key] = inputs[key].reshape(1)
    return inputs


def _pad(inputs: dict, edges: int, cutoff: float, atoms: Optional[int] = None) -> dict:
    """``inputs`` with the padding graph: two atoms (or up to ``atoms`` atoms in all),
    joined in pairs by the padding edges (``cuda_graphs.padding_edges``), ``edges``
    edges in all."""
    n, g, e = inputs[KEY.POS].shape[0], inputs[KEY.NUM_ATOMS].shape[0], inputs[KEY.EDGE_IDX].shape[1]
    atoms = n + 2 if atoms is None else atoms
    if edges < e or atoms < n + 2:
        raise ValueError(f"pad: {e} edges and {n} atoms (and 2 padding atoms) do not fit a capacity of "
                         f"{edges} edges and {atoms} atoms")
    if KEY.BATCH not in inputs:  # a single structure: graph 0
        inputs = {**inputs, KEY.BATCH: torch.zeros(n, dtype=torch.int64, device=inputs[KEY.POS].device)}
    k = atoms - n
    out = {}
    for key, value in inputs.items():
        if key == KEY.BATCH:
            extra = value.new_full((k,), g)
        elif key == KEY.POS:
            extra = cuda_graphs.padding_positions(k, cutoff, value)
        elif key in _ATOM_KEYS:
            extra = value[:1].expand(k, *value.shape[1:])  # the first atom's element: one the model knows
        elif key == KEY.NUM_ATOMS:
            extra = value.new_full((1,), k)
        elif key == KEY.CELL_VOLUME:
            extra = value.new_ones(1)
        elif key == KEY.MODAL_TYPE:
            extra = value[:1]  # the first graph's: one the model knows
        elif key == KEY.EDGE_IDX:
            extra = cuda_graphs.padding_edges(n, k, edges - e, value)
        else:  # the edge vectors: at the cutoff
            extra = value.new_zeros(edges - e, 3)
            extra[:, 0] = cutoff
        out[key] = torch.cat([value, extra], dim=_EDGE_DIMS.get(key, 0))
    return out


def padder(model: AtomGraphSequential):
    """The family's ``padder`` (``integrations.base.Family``): a collated batch's sizes
    and its inputs padded to capacities, for a training step's CUDA graph."""
    cutoff = float(model.cutoff)
    modal_map = dict(model.modal_map) if model.eval_modal_map else None

    def padding(batch):
        inputs = _inputs(batch, True, modal_map)
        sizes = inputs[KEY.POS].shape[0], inputs[KEY.NUM_ATOMS].shape[0], inputs[KEY.EDGE_IDX].shape[1]
        return sizes, lambda atoms, edges: _pad(inputs, edges, cutoff, atoms)

    return padding


def _real(out: dict, n: int, g: int, e: int, batched: bool, atoms: int) -> dict:
    """The model's outputs (its inputs stay the caller's) for the real graphs, atoms and
    edges (``atoms``: the padded call's), copied and detached; a single structure's
    per-graph outputs as its own."""
    real = {}
    for key, value in out.items():
        if key in _INPUTS or not torch.is_tensor(value) or value.dim() == 0:
            continue
        if key in _PER_GRAPH:
            value = value[:g] if batched else value[0]
        elif key in _PER_EDGE:
            value = value[:e]
        elif value.shape[0] == atoms:
            value = value[:n]
        else:
            continue
        real[key] = value.detach().clone()
    return real
