"""Data-parallel training over several processes (GPUs or CPU cores, one or many nodes) with torch DDP.

    torchrun --nproc_per_node N -m lorax.continual.ddp --out runs/x [--params params.yaml] [-S key=value ...]

Same arguments and outputs as ``lorax train``. Every process trains every task on its share of each batch; rank 0
alone selects exemplars, evaluates and writes (state, memory, metrics), and the others wait at a barrier and read
what it wrote, so ``--out`` must be on a filesystem all nodes share (see docs/cluster.md).

Why the results match one process: the global batches are the one-process batches (``train.batch_size`` is the
global batch). :class:`ShardedBatchSampler` draws the same seeded order and per-sample crop seeds in every process
and gives rank r the items ``r, r + world, ...`` of each global batch; each rank's loss is weighted by its share
(``n_rank * world / n_global``), so DDP's gradient average is the gradient of the global batch mean, also for an
uneven last batch. What differs: float summation order, and the LoRA dropout masks (drawn per process).
Exemplar selection runs once, on all of the task's rows, in rank 0 (global and deterministic).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# -- the stream under torchrun -------------------------------------------------------------------------------------
def run_stream_distributed(params, manifests_dir: str | Path, out: str | Path) -> dict[str, Any] | None:
    """``run_stream`` for every process of the group: all train, rank 0 selects, evaluates and summarises.

    Returns the metrics in rank 0, None elsewhere.
    """
    from lorax.continual.memory import ExemplarMemory
    from lorax.continual.state import is_state, read_info
    from lorax.continual.stream import eval_path, memory_path, run_stream, run_task_steps, state_dir
    from lorax.continual.trainer import train_task
    from lorax.data.manifest import load_stream_manifests

    ctx = init_from_env(params.train.device)
    out = Path(out)
    tasks = params.tasks
    manifests = load_stream_manifests(manifests_dir, tasks)
    prev_state = prev_memory = None
    for i, task in enumerate(tasks):
        s_out, m_out, e_out = state_dir(out, task), memory_path(out, task), eval_path(out, task)
        if not is_state(s_out) or read_info(s_out).get("tasks") != tasks[: i + 1]:
            memory = ExemplarMemory.load(prev_memory) if prev_memory is not None and prev_memory.is_file() else None
            train_task(prev_state, manifests[task], memory, params, s_out, history=[manifests[t] for t in tasks[:i]])
        if ctx.is_main:  # the state is complete now: this only selects exemplars and evaluates
            run_task_steps(params, manifests, task, prev_state, prev_memory, s_out, m_out, e_out)
        ctx.barrier()
        prev_state, prev_memory = s_out, m_out
    metrics = run_stream(params, manifests_dir, out) if ctx.is_main else None  # every task done: summary only
    ctx.barrier()
    return metrics


def main(argv: list[str] | None = None) -> int:
    import json

    from lorax.config import load_params
    from lorax.continual.commands import parse_overrides
    from lorax.continual.stream import format_matrix
    from lorax.registry import METHODS
    import lorax.continual.methods  # noqa: F401  (registers the methods)

    ap = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m lorax.continual.ddp",
                                 description="lorax train, data-parallel over the processes torchrun starts")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifests", help="manifest folder (default: data.manifests)")
    ap.add_argument("--out", required=True, help="output folder, on a filesystem every node shares")
    ap.add_argument("--method", help="continual method (default: continual.method)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = parse_overrides(args.set)
    if args.method:
        overrides["continual.method"] = args.method
    params = load_params(args.params, overrides)
    METHODS.get(params.continual.method)
    try:
        metrics = run_stream_distributed(params, Path(args.manifests or params.data.manifests), Path(args.out))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if metrics is not None:
        print(format_matrix(metrics))
        print(f"metrics: {Path(args.out) / 'metrics.json'}")
        print(json.dumps({k: metrics[k] for k in ("aa", "aaf", "bwt", "forgetting", "binary_acc")}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
