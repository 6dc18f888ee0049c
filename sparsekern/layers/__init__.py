"""Drop-in layers: each is built from the e3nn / MACE module it replaces
(``from_e3nn`` / ``from_mace``), shares its parameters, and computes the same."""

from .base import BACKENDS, SparsekernLayer
from .channelwise_tp import ChannelwiseConv, ChannelwiseTP
from .element_linear import ElementLinear
from .linear import IrrepsLinear
from .radial_mlp import RadialMLP
from .symmetric_contraction import SymmetricContraction

__all__ = ["BACKENDS", "SparsekernLayer", "IrrepsLinear", "ElementLinear", "ChannelwiseTP",
           "ChannelwiseConv", "SymmetricContraction", "RadialMLP"]
