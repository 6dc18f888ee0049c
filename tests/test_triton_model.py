"""A whole small MACE model patched with backend="triton" (Triton interpreter on CPU)
against the torch back end: energies, forces and force-loss gradients."""

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("mace")
from ase.build import bulk  # noqa: E402
from e3nn import o3  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.kernels import triton as tk  # noqa: E402
from sparsekern.model_zoo import mace_batch, mace_mp0_shaped  # noqa: E402
from helpers import rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not tk.available(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set before triton is imported) or a GPU")


def _physics(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(batch, training=True, compute_force=True)
    loss = (out["forces"] ** 2).sum() + out["energy"].sum()
    return out["energy"].detach(), out["forces"].detach(), torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("sparse", [False, True])
def test_mace_triton_matches_torch(sparse):
    base = mace_mp0_shaped("small", seed=21, num_elements=3, hidden_irreps=o3.Irreps("4x0e+4x1o"),
                           max_ell=2, correlation=2, r_max=3.0, radial_MLP=[8])
    atoms = bulk("C", "diamond", a=3.57)[:1] * (2, 1, 1)
    atoms.pbc = False
    atoms.numbers = [1, 3]
    atoms.rattle(0.1, seed=1)
    batch = mace_batch(base, [atoms])
    for p in base.parameters():
        p.requires_grad_(True)
    ref = sparsekern.patch(copy.deepcopy(base), backend="torch")
    if sparse:
        ref = sparsekern.prepare(ref, sparsekern.SparseConfig(density=0.2))
    ours = copy.deepcopy(ref)
    sparsekern.patch(ours, backend="triton")  # switches the back end of patched layers
    assert any(m.backend == "triton" for _, m in sparsekern.patched_layers(ours))
    expected, got = _physics(ref, batch), _physics(ours, batch)
    assert rel_err(got[0], expected[0]) <= 1e-12
    assert rel_err(got[1], expected[1]) <= 1e-12
    for a, b in zip(got[2], expected[2]):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) <= 1e-10
