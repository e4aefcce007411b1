"""Data-parallel training over several processes (GPUs or CPU cores, one or many nodes) with torch DDP: the
process group, the sharded batches and the gradient weighting that the trainer uses. The torchrun entry point that
drives a whole stream is :mod:`pipelines.ddp` (``torchrun --nproc_per_node N -m pipelines.ddp --out runs/x``).

Why the results match one process: the global batches are the one-process batches (``train.batch_size`` is the
global batch). :class:`ShardedBatchSampler` draws the same seeded order and per-sample crop seeds in every process
and gives rank r the items ``r, r + world, ...`` of each global batch; each rank's loss is weighted by its share
(``n_rank * world / n_global``), so DDP's gradient average is the gradient of the global batch mean, also for an
uneven last batch. What differs: float summation order, and the LoRA dropout masks (drawn per process).
Exemplar selection runs once, on all of the task's rows, in rank 0 (global and deterministic).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, its device (None: not distributed, use train.device)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            if self.device is not None and self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over all processes (in place; no-op in one process)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        """``module`` in DistributedDataParallel (gradients averaged over processes), or as is in one process.

        ``find_unused``: some trainable parameters may get no gradient in a step (top-1 routed MoLE experts).
        """
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index or 0] if self.device is not None and self.device.type == "cuda" else None
        # frozen backbones are identical in every process (seeded init / same weights file): no buffer broadcasts
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                       find_unused_parameters=find_unused)


def context() -> DistContext:
    """The current process group's context; a one-process context when none is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device)


def init_from_env(device_setting: str = "auto") -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...): NCCL on GPUs,
    gloo on CPU. Without torchrun's variables this is one process and nothing is initialised."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return context()
    use_cuda = device_setting != "cpu" and torch.cuda.is_available()
    if device_setting.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device: {device_setting!r} asked for but no CUDA device is available; use auto or cpu")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices on this node; "
                             "lower --nproc_per_node")
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    ctx = context()
    log.info("rank %d/%d on %s", ctx.rank, ctx.world, ctx.device)
    return ctx


class ShardedBatchSampler(Sampler[list]):
    """Global batches of ``sampler``'s items; this rank's share of each (items ``rank::world`` of the batch).

    Every rank takes the same number of steps. A rank whose share of a short last batch is empty gets the batch's
    first item as a stand-in with weight 0 (DDP needs every rank in every step). :meth:`share` gives the number of
    real items and the loss weight of a step. In one process this is exactly ``BatchSampler(sampler, batch_size)``.
    """

    def __init__(self, sampler: Sampler, batch_size: int, rank: int = 0, world: int = 1) -> None:
        if batch_size < world:
            raise ValueError(f"train.batch_size: {batch_size} is smaller than the {world} processes; each process "
                             "needs at least one image per batch (train.batch_size is the global batch)")
        self.sampler, self.batch_size, self.rank, self.world = sampler, int(batch_size), int(rank), int(world)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def share(self, step: int) -> tuple[int, float]:
        """(items of this rank in global batch ``step``, its loss weight ``n_rank * world / n_global``)."""
        n_global = min(self.batch_size, len(self.sampler) - step * self.batch_size)
        n_rank = len(range(self.rank, n_global, self.world))
        return n_rank, n_rank * self.world / n_global

    def __iter__(self) -> Iterator[list]:
        batch: list = []
        for item in self.sampler:  # lazily, like BatchSampler: the generator is read in the same order
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._mine(batch)
                batch = []
        if batch:
            yield self._mine(batch)

    def _mine(self, batch: list) -> list:
        return batch[self.rank :: self.world] or batch[:1]
