"""Drop-in layers: each is built from the e3nn / MACE module it replaces
(``from_e3nn``), shares its parameters, builds the descriptor of its op once, and
computes the same on the back end the op registry gives it."""

from .base import SparsekernLayer
from .channelwise_tp import ChannelwiseConv, ChannelwiseTP
from .element_linear import ElementLinear
from .gate import Gate
from .linear import IrrepsLinear
from .polynomial_cutoff import PolynomialCutoff
from .radial_mlp import RadialMLP
from .reshape_irreps import ReshapeIrreps
from .spherical_harmonics import SphericalHarmonics
from .symmetric_contraction import SymmetricContraction

__all__ = ["SparsekernLayer", "IrrepsLinear", "ElementLinear", "ChannelwiseTP",
           "ChannelwiseConv", "SymmetricContraction", "RadialMLP", "SphericalHarmonics", "PolynomialCutoff", "Gate",
           "ReshapeIrreps"]
