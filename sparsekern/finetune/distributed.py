"""Data-parallel fine-tuning on torch.distributed: the processes torchrun starts (gloo on
CPU, NCCL on CUDA) each take their share of every global batch, and one all_reduce per
step sums their gradients, losses and stop requests.

Gradients are summed explicitly rather than by wrapping the model in
``DistributedDataParallel``: the families call the bare model (its attributes, its
forward's keywords), force training differentiates inside the forward pass, ``to_fast``
swaps the trainable tensors mid-run, and a parameter no rank used must keep ``grad =
None`` (Adam then leaves it alone, as one process would). One flat buffer per step costs
one collective, like DDP with a single bucket; the deltas are small."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


class FromMain(ValueError):
    """Rank 0's ValueError, raised on every rank by ``Group.from_main``: rank 0 alone
    reports it."""


@dataclass(frozen=True)
class Group:
    """This process's place among those training together (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0

    def share(self, batch: Sequence) -> list:
        """This rank's frames of a global batch (every rank sees the same batch)."""
        return list(batch[self.rank::self.size])

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast_state(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank: the ranks start from one state
        (so the density controller, deterministic in the parameters, agrees too)."""
        if self.size > 1:
            for value in model.state_dict().values():
                if torch.is_tensor(value):  # (extra states are host values, equal by construction)
                    dense = value.contiguous()  # (NCCL broadcasts contiguous tensors only: e3nn's
                    dist.broadcast(dense, src=0)  # constants can be views)
                    if dense is not value:
                        value.copy_(dense)

    def from_main(self, work: Callable[[], Any]) -> Any:
        """``work()`` done by rank 0 alone, its result on every rank, or its ValueError
        raised on every rank as ``FromMain`` (rank 0 alone reads and writes the output folder)."""
        result, error = None, ""
        if self.main:
            try:
                result = work()
            except ValueError as exc:
                error = str(exc)
        if self.size > 1:
            box = [result, error]
            dist.broadcast_object_list(box, src=0)
            result, error = box
        if error:
            raise FromMain(error)
        return result

    def everywhere(self, work: Callable[[], Any]) -> Any:
        """``work()`` on every rank (the same work: reading the run's inputs); where it
        raises on any rank, every rank stops, and one says why: rank 0 re-raises its own
        error, else the first failing rank's message is raised as ``FromMain``."""
        if self.size == 1:
            return work()
        result, error = None, None
        try:
            result = work()
        except (ValueError, KeyError, OSError, ImportError) as exc:
            error = exc
        said = [None] * self.size
        dist.all_gather_object(said, None if error is None else (
            error.args[0] if isinstance(error, KeyError) and error.args else str(error)))
        first = next((message for message in said if message is not None), None)
        if first is None:
            return result
        if self.main and error is not None:
            raise error
        raise FromMain(first)

    def gather(self, items: dict) -> dict:
        """The union of every rank's ``items`` (keys disjoint across ranks), on every rank."""
        if self.size == 1:
            return items
        boxes = [None] * self.size
        dist.all_gather_object(boxes, items)
        return {k: v for box in boxes for k, v in box.items()}

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (the same result on every rank), in place."""
        if self.size > 1:
            if dist.get_backend() == "nccl" and not tensor.is_cuda:  # (NCCL reduces GPU tensors only)
                moved = tensor.cuda()
                dist.all_reduce(moved)
                tensor.copy_(moved)
            else:
                dist.all_reduce(tensor)
        return tensor

    def reduce_step(self, params: Sequence[torch.nn.Parameter], loss: float, signal: int) -> Tuple[float, int]:
        """Sum each parameter's gradient over the ranks (``None`` where no rank has one),
        the ranks' losses, and the signals they received (one slot per rank); returns the
        global loss and the signal to stop on (0: none)."""
        if self.size == 1:
            return loss, signal
        dtype = _common_dtype(params)
        device = params[0].device
        extra = torch.zeros(len(params) + 1 + self.size, dtype=torch.float64)
        extra[:len(params)] = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
        extra[len(params)] = loss
        extra[len(params) + 1 + self.rank] = signal
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
        flat = torch.cat(grads + [extra.to(dtype=dtype, device=device)])
        dist.all_reduce(flat)
        _unpack(params, flat)
        summed = flat[-(1 + self.size):].double().cpu()
        return float(summed[0]), int(summed[1:].max())


def _common_dtype(params: Sequence[torch.nn.Parameter]) -> torch.dtype:
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return torch.promote_types(dtype, torch.float32)  # the flags, losses and signals fit


def _unpack(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Each parameter's summed gradient out of ``flat`` (gradients, then one flag per
    parameter: did any rank have a gradient)."""
    offset = 0
    used = flat[sum(p.numel() for p in params):][:len(params)].tolist()
    for p, flag in zip(params, used):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if flag else None
        offset += n


def join(device: str) -> Tuple[Group, str]:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1):
    NCCL with this process's GPU (``LOCAL_RANK``) for a CUDA ``device``, else gloo.
    Returns the group and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return Group(), device
    if torch.device(device).type == "cuda":
        check_gpus(device)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: local rank {local} needs GPU {local}, but this machine shows "
                             f"{torch.cuda.device_count()} (one process per GPU)")
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Group(dist.get_rank(), dist.get_world_size()), device


def check_gpus(device: str, processes: Optional[int] = None) -> None:
    """Several processes on CUDA take one GPU each, that of their local rank: refuse a
    ``device`` that names one GPU, or more ``processes`` (on this machine) than it has GPUs."""
    if torch.device(device).index is not None:
        raise ValueError(f"--device {device} names one GPU, but each process takes the GPU of its local rank: "
                         "give --device cuda")
    if processes is not None and processes > torch.cuda.device_count():
        raise ValueError(f"{processes} processes need {processes} GPUs (one each), but this machine shows "
                         f"{torch.cuda.device_count()}")


def leave(group: Group) -> None:
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def launched_size() -> int:
    """How many processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
