"""GPU proxy: the symmetric contraction's loads are whole sectors. Each load of its table
kernel is a tile of 32 channels of one component: with the channels innermost that is
one 128-byte run (4 sectors), in MACE's (N, C, d) layout 32 runs d floats apart (up to
32 sectors: the L1's work per load, which the second GPU run's contraction rows were
bound by; benchmarks/NOTES.md). Counted under the interpreter by
``benchmarks/kernel_loads.py``'s counter, in the forward, the backward and the double
backward of force training."""
import sys
from pathlib import Path

import pytest
import torch

from helpers import triton_device

pytest.importorskip("mace")
DEVICE = triton_device()
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from kernel_loads import Loads  # noqa: E402
from test_triton_symmetric_contraction import make_layer, node_inputs  # noqa: E402


@pytest.mark.gpu_proxy
@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's loads")
def test_contraction_loads_are_whole_sectors():
    layer = make_layer("32x0e+32x1o+32x2e", "32x0e+32x1o", 3, torch.float32).set_backend("triton")
    x, attrs = node_inputs(layer, torch.float32, species=[0, 2, 2, 0, 2] * 4)
    x.requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]
    with Loads() as fwd:
        out = layer(x, attrs)
    with Loads() as bwd:
        grads = torch.autograd.grad((out ** 2).sum(), [x] + params, create_graph=True)
    with Loads() as dbl:
        torch.autograd.grad(sum((g ** 2).sum() for g in grads), [x] + params)
    for name, counts in (("forward", fwd), ("backward", bwd), ("double backward", dbl)):
        k = counts.by_kernel["_form_kernel"]
        # whole sectors: 32 B of sectors per 32 B asked for, plus the table's scalars
        # (1.00-1.01x here; in MACE's layout, 6.1x in the forward)
        assert k["programs"] and 32 * k["warp_sectors"] <= 1.1 * k["requested"], (name, k["requested"],
                                                                                  32 * k["warp_sectors"])
