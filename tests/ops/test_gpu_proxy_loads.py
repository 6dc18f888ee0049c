"""GPU proxy: the Triton kernels' loads are whole sectors. Each load is a tile of 32
channels of one component: with the channels innermost that is one 128-byte run (4
sectors), in e3nn's / MACE's layouts 32 runs d floats apart (up to 32 sectors: the L1's
work per load, which the second GPU run's contraction rows were bound by;
benchmarks/NOTES.md). Counted under the interpreter by ``benchmarks/kernel_loads.py``'s
counter in the forward, the backward and the double backward of force training, for
the symmetric contraction, the fused conv and the irrep linear (32 channels, l <= 2)."""
import sys
from pathlib import Path

import pytest
import torch

from helpers import triton_device

pytest.importorskip("mace")
DEVICE = triton_device()
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from kernel_loads import Loads  # noqa: E402
from test_triton_conv import make as make_conv  # noqa: E402
from test_triton_symmetric_contraction import make_layer, node_inputs  # noqa: E402

from sparsekern.layers import IrrepsLinear  # noqa: E402
from sparsekern.ops.triton.conv import conv as triton_conv  # noqa: E402

pytestmark = [pytest.mark.gpu_proxy, pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's loads")]
IRREPS = "32x0e+32x1o+32x2e"


def _passes(run, inputs, params=()):
    """The loads of each pass, by kernel."""
    wrt = [*inputs, *params]
    with Loads() as fwd:
        out = run(*inputs)
    with Loads() as bwd:
        grads = torch.autograd.grad((out ** 2).sum(), wrt, create_graph=True)
    with Loads() as dbl:
        torch.autograd.grad(sum((g ** 2).sum() for g in grads), wrt)
    return {"forward": fwd, "backward": bwd, "double backward": dbl}


def _whole_sectors(passes, most: float) -> None:
    """32 B of sectors per 32 B asked for, plus the tables' and indices' scalars and the
    ragged tails: at most ``most`` times."""
    for name, counts in passes.items():
        assert counts.by_kernel, name
        for kernel, k in counts.by_kernel.items():
            assert 32 * k["warp_sectors"] <= most * k["requested"], (name, kernel, k["requested"],
                                                                       32 * k["warp_sectors"])


def test_contraction_loads_are_whole_sectors():
    """1.00-1.01x; in MACE's (N, C, d) layout, 6.1x in the forward."""
    layer = make_layer(IRREPS, "32x0e+32x1o", 3, torch.float32).set_backend("triton")
    x, attrs = node_inputs(layer, torch.float32, species=[0, 2, 2, 0, 2] * 4)
    params = [p for p in layer.parameters() if p.requires_grad]
    _whole_sectors(_passes(lambda x_: layer(x_, attrs), [x.requires_grad_()], params), 1.1)


def test_conv_loads_are_whole_sectors():
    """1.04-1.16x (the gathers of node operands from their component-major copies)."""
    conv, x, y, w, edges = make_conv(IRREPS, "0e+1o+2e", 2, 12, 60, torch.float32)
    inputs = [t.requires_grad_() for t in (x, y, w)]
    _whole_sectors(_passes(lambda a, b, c: triton_conv(conv.desc, a, b, c, edges), inputs), 1.3)


def test_linear_loads_are_whole_sectors():
    """1.03-1.05x."""
    layer = IrrepsLinear(IRREPS, IRREPS).set_backend("triton")
    x = torch.randn(20, layer.irreps_in.dim, requires_grad=True)
    _whole_sectors(_passes(layer, [x], [layer.weight]), 1.1)
