"""SevenNet without host reads. Its forward copies the table from atomic numbers to
type indices (a plain attribute, left on the CPU) to the device on every call;
``AtomReduce`` sizes the energies by ``int(batch.max()) + 1``; ``ForceStressOutputFromEdge``
sizes forces and stresses by ``torch.sum(num_atoms)`` and ``int(batch.max()) + 1`` and
clamps the cell volume through a boolean mask (or ``bool()`` of a comparison). On a GPU
each is a host-device sync, seven in a training batch's call and five in the
calculator's: the host stops queueing kernels until the device has caught up, and no
CUDA graph can hold the call. Patching makes the table a buffer (not saved: state dicts
are unchanged), which moves with the model, and swaps the two classes for the subclasses
below, which read the sizes from shapes (atoms: rows of the positions; graphs: entries
of ``num_atoms``) and clamp with ``clamp_min``: the same values, bit for bit (sums in
SevenNet's order). Two differences: a batch whose last graphs have no atoms gets their
(zero) energies too, where SevenNet's count stops at the last atom's graph; and the
input's cell volume is not overwritten with its clamp. Unpatching undoes both. Imported
only once a SevenNet model is met."""

from __future__ import annotations

import torch
from sevenn import _keys as KEY
from sevenn.nn.force_output import ForceStressOutputFromEdge
from sevenn.nn.linear import AtomReduce
from sevenn.nn.util import broadcast

_VOLUME_FLOOR = 1e-3  # SevenNet's, for the zero volume of a structure without a cell


def _atoms(data) -> int:
    return data[KEY.POS].shape[0]


def _graphs(data) -> int:
    return data[KEY.NUM_ATOMS].reshape(-1).shape[0]  # (one uncollated graph holds a 0-d count)


def _summed(rows: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` summed into ``rows`` rows by ``index``, as SevenNet sums them."""
    return values.new_zeros(rows, *values.shape[1:]).scatter_reduce_(0, broadcast(index, values, 0), values, "sum")


class SyncFreeAtomReduce(AtomReduce):
    def forward(self, data):
        if not self._is_batch_data:  # a sum: no size to read
            return super().forward(data)
        data[self.key_output] = _summed(_graphs(data), data[KEY.BATCH], data[self.key_input].squeeze(1)) * self.constant
        return data


class SyncFreeForceStressOutputFromEdge(ForceStressOutputFromEdge):
    def forward(self, data):
        rij, (src, dst) = data[self.key_edge], data[self.key_edge_idx]
        fij = torch.autograd.grad([data[self.key_energy].sum()], [rij], create_graph=self.training,
                                  allow_unused=True)[0]
        if fij is None:
            return data
        n = _atoms(data)
        data[self.key_force] = _summed(n, src, fij) - _summed(n, dst, fij)
        virial = torch.cat([rij * fij, (rij[:, 0] * fij[:, 1]).unsqueeze(-1), (rij[:, 1] * fij[:, 2]).unsqueeze(-1),
                            (rij[:, 2] * fij[:, 0]).unsqueeze(-1)], dim=-1)
        per_atom = _summed(n, dst, virial)
        if self.use_atomic_virial:
            data[self.key_atomic_virial] = torch.neg(per_atom)
        volume = data[self.key_cell_volume].clamp_min(_VOLUME_FLOOR)
        if self._is_batch_data:
            total = _summed(_graphs(data), data[KEY.BATCH], per_atom)
        else:
            total = per_atom.sum(0)
        data[self.key_stress] = torch.neg(total) / volume.unsqueeze(-1)
        return data


_SWAPS = {AtomReduce: SyncFreeAtomReduce, ForceStressOutputFromEdge: SyncFreeForceStressOutputFromEdge}


_TABLE = "z_to_onehot_tensor"


def swap(model: torch.nn.Module) -> None:
    """SevenNet's type tables and readout modules in ``model`` (exactly those classes;
    the SevenNet model may sit inside another, as beside magnetic modules) made sync-free."""
    for module in model.modules():
        if isinstance(module.__dict__.get(_TABLE), torch.Tensor):
            module.register_buffer(_TABLE, module.__dict__.pop(_TABLE), persistent=False)
        new = _SWAPS.get(type(module))
        if new is not None:
            module.__class__ = new


def unswap(model: torch.nn.Module) -> None:
    back = {new: old for old, new in _SWAPS.items()}
    for module in model.modules():
        if _TABLE in module._non_persistent_buffers_set:
            module._non_persistent_buffers_set.discard(_TABLE)
            object.__setattr__(module, _TABLE, module._buffers.pop(_TABLE))
        old = back.get(type(module))
        if old is not None:
            module.__class__ = old
