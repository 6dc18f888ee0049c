"""torch.compile of a patched MACE model through MACE's own compile route
(``mace.tools.compile.prepare``, what ``MACECalculator(compile_mode=...)`` uses): energy,
forces and stress equal eager's in float64 on two graphs with other species counts and
neighbour counts. One graph (fullgraph): MACE traces ``torch.autograd.grad`` into the
graph, and behind a graph break the forces come out wrong."""

import pytest
import torch

pytest.importorskip("mace")
from ase.build import bulk  # noqa: E402
from e3nn import o3  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.integrations.mace.models import mace_batch, mace_mp0_shaped  # noqa: E402
from sparsekern.layers import ChannelwiseConv, ElementLinear, SymmetricContraction  # noqa: E402
from helpers import TOL, rel_err  # noqa: E402


def _crystal(seed, elements, a, repeat):
    atoms = bulk("Si", "diamond", a=a, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    atoms.numbers = [elements[i % len(elements)] for i in range(len(atoms))]
    return atoms


def _physics(model, atoms):
    """As MACECalculator runs a compiled model: the positions require grad before the
    call (compiled MACE does not set it), and ``training=True`` keeps the graph of
    the forces' autograd.grad (AOTAutograd differentiates it once more)."""
    batch = mace_batch(model, [atoms])
    batch["positions"].requires_grad_(True)
    batch["node_attrs"].requires_grad_(True)
    out = model(batch, compute_force=True, compute_stress=True, training=True)
    return [out[key].detach() for key in ("energy", "forces", "stress")]


def test_patched_mace_through_mace_compile_route():
    """MP-0-shaped (hidden irreps and l_max cut to keep the compile to about 2 minutes on
    2 cores); patched inside the factory MACE's ``prepare`` wraps, so its e3nn code
    generation is off and its simplification leaves our layers alone."""
    from mace.tools.compile import prepare

    model = prepare(lambda: sparsekern.patch(mace_mp0_shaped(
        "small", seed=1, num_elements=3, hidden_irreps=o3.Irreps("4x0e+4x1o"), max_ell=2), backend="torch"))()
    kinds = {type(m) for m in model.modules()}
    assert {ChannelwiseConv, ElementLinear, SymmetricContraction} <= kinds
    for p in model.parameters():  # as MACECalculator
        p.requires_grad_(False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # Inductor aborts here
    graphs = [_crystal(2, (1, 1, 2, 3), 5.43, (1, 1, 1)), _crystal(3, (3, 2), 5.0, (2, 1, 1))]
    for atoms in graphs:
        for got, expected in zip(_physics(compiled, atoms), _physics(model, atoms)):
            assert rel_err(got, expected) <= TOL[torch.float64]
