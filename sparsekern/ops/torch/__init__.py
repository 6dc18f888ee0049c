"""The torch back end: the reference every other back end is tested against, and the
fast CPU path. It implements every op."""

from . import (conv, gate, linear, polynomial_cutoff, radial_mlp, reshape_irreps, spherical_harmonics,
               symmetric_contraction)

# op name -> function (the submodules keep their names: ``ops.torch.conv`` is the module)
OPS = {"linear": linear.linear, "element_linear": linear.element_linear, "channelwise_tp": conv.channelwise_tp,
       "conv": conv.conv, "symmetric_contraction": symmetric_contraction.symmetric_contraction,
       "radial_mlp": radial_mlp.radial_mlp, "spherical_harmonics": spherical_harmonics.spherical_harmonics,
       "polynomial_cutoff": polynomial_cutoff.polynomial_cutoff, "gate": gate.gate,
       "reshape_irreps": reshape_irreps.reshape_irreps}
