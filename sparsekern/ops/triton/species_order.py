"""Nodes sorted by element, once per species tensor (per graph), with device ops only:
the symmetric contraction and the element linear group their nodes by element from the
same sort."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..tensor_cache import cached


@dataclass(eq=False)
class ElementSort:
    """Kept with the species tensor (so it must not hold it): every layer and pass of a
    graph shares one."""
    order: torch.Tensor  # (N,) node indices, stably sorted by element
    sorted: torch.Tensor  # (N,) species[order]
    n_el: int

    @functools.cached_property
    def start(self) -> torch.Tensor:
        """(n_el + 1,) int32: element z owns ``order[start[z]:start[z + 1]]``."""
        elements = torch.arange(self.n_el + 1, device=self.sorted.device, dtype=self.sorted.dtype)
        return torch.searchsorted(self.sorted, elements, out_int32=True)


def element_sort(species: torch.Tensor, n_el: int) -> ElementSort:
    def build():
        values, order = torch.sort(species, stable=True)
        return ElementSort(order, values, n_el)

    return cached(species, ("element_sort", n_el), build)
