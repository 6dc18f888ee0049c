"""The padding of a CUDA graph's call (``integrations/cuda_graphs.py``) at MACE-MP-0's
scale, for each family's pad: the padding edges stay within pairs of padding atoms whose
ends are a cutoff or more apart, and no padding atom sends or receives more than about
four times the real atoms' mean degree (a program of the conv's kernels loops over the
largest degree among its atoms: with every padding edge on two atoms, one program ran
half the padding edges). Inference (two padding atoms or more, by
``padding_atoms``) and training (the atoms' capacity)."""

import pytest
import torch

from sparsekern.integrations import cuda_graphs
from sparsekern.magnetism.graph import MagneticBatch, pad as magnetic_pad

N, E, HEADROOM = 20_000, 1_000_000, 0.1
MEAN = E / N


def _graph():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, N, (2, E), generator=g), torch.randn(N, 3, generator=g) * 30


def _capacities(training: bool):
    """(atoms, edges) padded to: the inference call's, or a training step's capacities."""
    edges = cuda_graphs.capacity(E, HEADROOM)
    atoms = cuda_graphs.capacity(N + 2, HEADROOM) if training else N + cuda_graphs.padding_atoms(N, E, edges)
    return atoms, edges


def _check(edge_index, atoms: int, training: bool, lengths=None, apart: float = 0.0):
    pad_edges = edge_index[:, E:]
    assert pad_edges.shape[1] > 0 and bool((pad_edges >= N).all()) and bool((pad_edges < atoms).all())
    assert torch.equal(edge_index[:, :E], _graph()[0])
    bound = 4 * MEAN + 2
    for ends in pad_edges:
        assert torch.bincount(ends - N, minlength=atoms - N).max() <= bound
    if lengths is not None:
        assert bool((lengths >= apart).all())
    if not training:  # a few per cent more atoms
        assert atoms - N <= 0.05 * N


@pytest.mark.parametrize("training", [False, True])
def test_mace_padding(training):
    from sparsekern.integrations.mace.graphed import pad

    edge_index, pos = _graph()
    atoms, edges = _capacities(training)
    data = {"positions": pos.double(), "node_attrs": torch.nn.functional.one_hot(torch.arange(N) % 3).double(),
            "batch": torch.zeros(N, dtype=torch.long), "ptr": torch.tensor([0, N]), "cell": torch.zeros(3, 3).double(),
            "edge_index": edge_index, "shifts": torch.zeros(E, 3).double(), "unit_shifts": torch.zeros(E, 3).double()}
    out = pad(data, edges, 6.0, atoms)
    p = out["positions"]
    s, r = out["edge_index"][:, E:]
    _check(out["edge_index"], atoms, training, (p[r] - p[s] + out["shifts"][E:]).norm(dim=1), 12.0)


@pytest.mark.parametrize("training", [False, True])
def test_magnetic_padding(training):
    edge_index, pos = _graph()
    atoms, edges = _capacities(training)
    batch = MagneticBatch(pos.double(), torch.zeros(N, dtype=torch.long), torch.zeros(N, 3).double(), edge_index,
                          torch.zeros(E, 3).double(), torch.zeros(N, dtype=torch.long), 1, torch.ones(1).double())
    out = magnetic_pad(batch, atoms, edges, 6.0)
    p, offsets = out["magnetic_positions"], out["magnetic_offsets"][E:]
    s, r = out["magnetic_edges"][:, E:]
    _check(out["magnetic_edges"], atoms, training, (p[r] - p[s] + offsets).norm(dim=1), 12.0)


@pytest.mark.parametrize("training", [False, True])
def test_sevennet_padding(training):
    pytest.importorskip("sevenn")
    import sevenn._keys as KEY

    from sparsekern.integrations.sevennet.graphed import _pad

    edge_index, pos = _graph()
    atoms, edges = _capacities(training)
    inputs = {KEY.POS: pos, KEY.BATCH: torch.zeros(N, dtype=torch.long), KEY.NUM_ATOMS: torch.tensor([N]),
              KEY.CELL_VOLUME: torch.ones(1), KEY.EDGE_IDX: edge_index, KEY.EDGE_VEC: torch.randn(E, 3)}
    out = _pad(inputs, edges, 5.0, atoms)
    p = out[KEY.POS]
    s, r = out[KEY.EDGE_IDX][:, E:]
    assert bool(((p[r] - p[s]).norm(dim=1) == 5.0).all()) and bool((out[KEY.EDGE_VEC][E:].norm(dim=1) == 5.0).all())
    _check(out[KEY.EDGE_IDX], atoms, training)


def test_padding_edges_need_two_padding_atoms():
    with pytest.raises(ValueError, match="padding edges need two padding atoms at least, got 1"):
        cuda_graphs.padding_edges(10, 1, 5, torch.zeros(1, dtype=torch.long))
