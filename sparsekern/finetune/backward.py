"""A training step's backward into the trained tensors alone.

Force training makes the positions a leaf that asks for a gradient (MACE sets
``requires_grad`` to differentiate the energy), so a plain ``loss.backward()`` also runs
every node that leads only there: the force's own derivative wrt the positions (the
spherical harmonics', the cutoff's and the radial basis' second derivatives, the radial
MLPs' input gradients), which nothing reads. Naming the trained tensors (``inputs=``)
lets autograd's engine skip those nodes; the trained tensors' gradients are the same."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def backward(loss: torch.Tensor, trained: Sequence[torch.Tensor], gradient=None, retain_graph=None,
             create_graph: bool = False) -> None:
    """``loss.backward()`` into those of ``trained`` that ask for a gradient (a frozen one
    may sit in an optimizer); the others' ``.grad`` is left as it is."""
    wanted = [t for t in trained if t.requires_grad]
    torch.Tensor.backward(loss, gradient, retain_graph, create_graph, wanted or None)


class _TrainedLoss(torch.Tensor):
    """A loss whose ``backward()`` goes into the trained tensors only: what MACE's
    ``take_step`` calls on the loss its ``loss_fn`` returns."""

    trained: Sequence[torch.Tensor]

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        loss = self.as_subclass(torch.Tensor)
        if inputs is None:
            backward(loss, self.trained, gradient, retain_graph, create_graph)
        else:
            loss.backward(gradient, retain_graph, create_graph, inputs)


def into_trained(loss_fn: Callable[..., torch.Tensor], trained: Sequence[torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss_fn`` whose losses' ``backward()`` goes into ``trained`` only."""
    def trained_loss(*args, **kwargs):
        loss = loss_fn(*args, **kwargs).as_subclass(_TrainedLoss)
        loss.trained = trained
        return loss
    return trained_loss
