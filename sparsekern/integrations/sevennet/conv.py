"""SevenNet's convolution on the fused conv: ``IrrepsConvolution.forward`` gathers the
senders' features, runs its ``convolution`` (an e3nn 'uvu' TensorProduct) per edge and
scatters the messages to the receivers. Patching swaps the block's class for the
subclass below, whose forward hands all three to the :class:`ChannelwiseConv` that
replaced ``convolution``; unpatching swaps it back. Imported only once a SevenNet
convolution is met."""

from __future__ import annotations

import torch
from sevenn import _keys as KEY
from sevenn.nn.convolution import IrrepsConvolution

from ...ops.tensor_cache import cached


class FusedIrrepsConvolution(IrrepsConvolution):
    """``IrrepsConvolution`` whose ``convolution`` is a ``ChannelwiseConv``: the same
    result, the per-edge messages never formed. The weights stay where they were (the
    radial MLP ``weight_nn``, the ``denominator``); the product has none of its own."""

    def forward(self, data):
        weight = self.weight_nn(data[self.key_weight_input])
        x = data[self.key_x]
        if self.is_parallel:  # ghost atoms are senders only; their rows are dropped below
            x = torch.cat([x, data[KEY.NODE_FEATURE_GHOST]])
        # SevenNet's edge_index is (receiver, sender); the fused conv takes (sender, receiver).
        # One flipped copy per graph: the fused conv keeps its edge orderings with it, so
        # every block (and pass) of the graph shares them
        edges = data[self.key_edge_idx]
        x = self.convolution(x, data[self.key_filter], weight, cached(edges, "flipped", lambda: edges.flip(0)))
        x = x.div(self.denominator)
        if self.is_parallel:
            x = torch.tensor_split(x, data[KEY.NLOCAL])[0]
        data[self.key_x] = x
        return data


def fuse(block: torch.nn.Module) -> bool:
    """Make a plain ``IrrepsConvolution`` call its convolution fused (not its subclasses:
    sevenn's accelerated ones have forwards of their own)."""
    if type(block) is not IrrepsConvolution:
        return False
    block.__class__ = FusedIrrepsConvolution
    return True


def unfuse(block: torch.nn.Module) -> None:
    if type(block) is FusedIrrepsConvolution:
        block.__class__ = IrrepsConvolution
