"""The cuEquivariance back end: each op is a cuequivariance ``SegmentedPolynomial`` built
from the descriptor's own paths and float64 coefficients (so the numbers are exactly the
torch back end's; none of cuequivariance's normalisations), run by cuequivariance_torch:
its CUDA kernel ``uniform_1d`` where it applies, its pure-torch ``naive`` method
elsewhere (any device; autograd to any order)."""

from . import conv, symmetric_contraction

# op name -> function (the submodules keep their names: ``ops.cueq.conv`` is the module)
OPS = {"channelwise_tp": conv.channelwise_tp, "conv": conv.conv,
       "symmetric_contraction": symmetric_contraction.symmetric_contraction}
