"""A MACE model whose inference calls replay CUDA graphs: for molecular dynamics
(:mod:`..cuda_graphs` says why). Each call is padded to an edge capacity: padding atoms
in a graph of their own, in pairs 2 r_max apart (padding edges join each pair: beyond the
cutoff, zero weights and zero messages, nothing reaches the real atoms or the real
graphs' energies, forces and stresses), and edges up to the capacity. One graph per
(atoms, graphs, edge capacity, dtype, flags).

Training (or a parameter that needs a gradient) runs the model eagerly, and so does a
call whose capture fails (said once in a warning); every call on the CPU runs padded,
eagerly (how the tests check the padding)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import cuda_graphs

_NODE_KEYS = ("positions", "node_attrs", "batch")
_EDGE_KEYS = ("shifts", "unit_shifts")
_EDGE_DIMS = {"edge_index": 1, **{key: 0 for key in _EDGE_KEYS}}


class GraphedMACE(torch.nn.Module):
    """``model`` (a MACE model, patched or not) called through padded CUDA graphs; its
    attributes (``r_max``, ``atomic_numbers``, ``heads``...) read through, so MACE's
    calculator takes it: ``MACECalculator(models=GraphedMACE(model), device="cuda")``."""

    def __init__(self, model: torch.nn.Module, headroom: float = 0.1) -> None:
        super().__init__()
        self.model, self.replays = model, cuda_graphs.Replays("GraphedMACE", headroom)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, data: Dict[str, torch.Tensor], training: bool = False, **flags):
        if training or (torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())):
            return self.model(data, training=training, **flags)
        missing = [k for k in ("edge_index", "ptr", "cell", *_NODE_KEYS, *_EDGE_KEYS) if k not in data]
        if missing:
            raise ValueError(f"GraphedMACE: the batch lacks {missing} (a MACE AtomicData batch has them)")
        n, g, e = data["positions"].shape[0], data["ptr"].shape[0] - 1, data["edge_index"].shape[1]
        def padded(data, edges):  # the padding atoms of this call's edges (r_max read here: a sync)
            return pad(data, edges, float(self.model.r_max), n + cuda_graphs.padding_atoms(n, e, edges))

        if not cuda_graphs.replayable(data["positions"].device):
            inputs = padded(data, cuda_graphs.capacity(e, self.replays.headroom))
            return _real(self.model(inputs, **flags), n, g, e, inputs["positions"].shape[0])
        key = (n, g, data["positions"].dtype, tuple(sorted(flags.items())))
        captured = self.replays.get(key, (e,), lambda edges, pool: cuda_graphs.Captured(
            lambda static: self.model(static, **flags), padded, data, edges[0], _EDGE_DIMS, pool),
            cuda_graphs.State(self.model))
        if captured is None:
            return self.model(data, **flags)
        return _real(captured(data), n, g, e, captured.static["positions"].shape[0])


def pad(data: Dict[str, torch.Tensor], edges: int, r_max: float, atoms: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The MACE batch ``data`` with padding atoms (element 0 of the model's table; two,
    or up to ``atoms`` atoms in all) in a graph of their own, and padding edges within
    their pairs, 2 ``r_max`` apart (``cuda_graphs.padding_edges``), up to ``edges``
    edges; keys other than the model's inputs are left out."""
    pos, ptr = data["positions"], data["ptr"]
    n, g, e = pos.shape[0], ptr.shape[0] - 1, data["edge_index"].shape[1]
    atoms = n + 2 if atoms is None else atoms
    if edges < e or atoms < n + 2:
        raise ValueError(f"pad: {e} edges and {n} atoms (and 2 padding atoms) do not fit a capacity of "
                         f"{edges} edges and {atoms} atoms")
    out = {}
    out["positions"] = torch.cat([pos, cuda_graphs.padding_positions(atoms - n, 2 * r_max, pos)])
    attrs = data["node_attrs"].new_zeros(atoms - n, data["node_attrs"].shape[1])
    attrs[:, 0] = 1
    out["node_attrs"] = torch.cat([data["node_attrs"], attrs])
    out["batch"] = torch.cat([data["batch"], data["batch"].new_full((atoms - n,), g)])
    out["ptr"] = torch.cat([ptr, ptr.new_full((1,), atoms)])
    out["cell"] = torch.cat([data["cell"], 4 * r_max * torch.eye(3, dtype=data["cell"].dtype, device=pos.device)])
    if "head" in data:
        out["head"] = torch.cat([data["head"], data["head"][:1] * 0])
    k = edges - e
    padding = cuda_graphs.padding_edges(n, atoms - n, k, data["edge_index"])
    out["edge_index"] = torch.cat([data["edge_index"], padding], 1)
    for key in _EDGE_KEYS:
        out[key] = torch.cat([data[key], data[key].new_zeros(k, 3)])
    return out


_PER_GRAPH = {"energy", "interaction_energy", "stress", "virials", "displacement", "dipole", "polarizability"}
_PER_NODE = {"node_energy", "forces", "node_feats", "atomic_stresses", "atomic_virials"}


def _real(out: Dict[str, torch.Tensor], n: int, g: int, e: int, atoms: int) -> Dict[str, torch.Tensor]:
    """The model's outputs for the real graphs, atoms and edges (cloned: a replay
    overwrites them; ``atoms``: the padded call's); an output MACE's names do not place is
    placed by its length."""
    real = {}
    for key, value in out.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            real[key] = value
            continue
        rows = g if key in _PER_GRAPH else n if key in _PER_NODE else {g + 1: g, atoms: n}.get(value.shape[0], e)
        real[key] = value[:rows].clone()
    return real
