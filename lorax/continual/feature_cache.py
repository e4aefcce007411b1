"""Frozen-feature cache (``train.feature_cache``): the old adapters' embeddings computed once per task.

While task t trains, adapters 0..t-1 are frozen and deterministic (no dropout, frozen backbone), so their embedding
of a given crop never changes during the task. Recomputing them every epoch is what makes the published LoRAX's
training cost grow with the task index. With the cache, each training image gets a fixed set of
``train.feature_cache_crops`` (K) random crops (+ flips), drawn once per task from the task's seed; the old
adapters embed all of them once, before the first epoch; every epoch then picks one of the K crops per image
(seeded), and a step only runs the trunk and the newest adapter (``LoRAXNet.forward(x, old_emb=...)``).

What it changes: train-time augmentation is limited to those K crops per image for the whole task, for
the new adapter too (it must see the same crop as the cached old embeddings of the sample: the super-feature is
one crop's embeddings). With K >= epochs the augmentation is close to the uncached run's; with K=1 every epoch sees
the same crop. Nothing else changes: logits on a cached crop equal the uncached forward (tested). Evaluation and
exemplar selection do not use the cache. Cost: building it is K passes of the frozen adapters over the task's
training rows (once per task); memory is rows x K x (t-1) x embed_dim float32, on the CPU.

With ``train.trunk_cache`` the K crops of an image come from its sha256 instead of the task's seed (:func:`lorax.continual.trunk_cache.content_seeds`): the same crops in every task
and run, so their frozen-trunk tokens are computed once; the old adapters' embeddings are then built from those
tokens (``build(..., from_trunk=True)``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lorax.continual.distributed import DistContext
from lorax.data.dataset import ManifestDataset

log = logging.getLogger(__name__)


class SlotDataset(Dataset):
    """Cache slot ``row * K + k`` -> (crop k of row, class id, slot): the crop is fixed by the slot's seed."""

    def __init__(self, base: ManifestDataset, seeds: torch.Tensor) -> None:
        if not base.train:
            raise ValueError("the feature cache fixes train crops: pass a train dataset")
        self.base, self.seeds = base, seeds
        self.k = seeds.shape[1]

    def __len__(self) -> int:
        return self.seeds.numel()

    def __getitem__(self, slot: int) -> tuple[torch.Tensor, int, int]:
        row, k = divmod(int(slot), self.k)
        x, y, _ = self.base[(row, int(self.seeds[row, k]))]
        return x, y, int(slot)


class SlotSampler(Sampler[int]):
    """One epoch: every row once in a seeded random order, each with one of its K crops (seeded)."""

    def __init__(self, n_rows: int, k: int, generator: torch.Generator) -> None:
        self.n_rows, self.k, self.generator = n_rows, k, generator

    def __len__(self) -> int:
        return self.n_rows

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n_rows, generator=self.generator)
        pick = torch.randint(0, self.k, (self.n_rows,), generator=self.generator)
        yield from (order * self.k + pick[order]).tolist()


class FrozenFeatureCache:
    """Embeddings of the frozen adapters for K fixed crops of every training row, as (rows * K, t - 1, D)."""

    def __init__(self, n_rows: int, crops: int, seed: int, seeds: torch.Tensor | None = None) -> None:
        """``seeds`` (n_rows, crops): the crop seeds to use (from the images' content with the trunk cache); default: drawn from
        ``seed``."""
        if crops < 1:
            raise ValueError(f"train.feature_cache_crops: must be >= 1, got {crops}")
        if seeds is None:
            seeds = torch.randint(0, 2**62, (n_rows, crops), generator=torch.Generator().manual_seed(seed))
        if tuple(seeds.shape) != (n_rows, crops):
            raise ValueError(f"crop seeds of shape {tuple(seeds.shape)}, expected {(n_rows, crops)}")
        self.seeds = seeds
        self.k = crops
        self.emb: torch.Tensor | None = None

    @property
    def n_slots(self) -> int:
        return self.seeds.numel()

    def dataset(self, base: ManifestDataset) -> SlotDataset:
        if len(base) != self.seeds.shape[0]:
            raise ValueError(f"feature cache made for {self.seeds.shape[0]} rows, dataset has {len(base)}")
        return SlotDataset(base, self.seeds)

    def sampler(self, generator: torch.Generator) -> SlotSampler:
        return SlotSampler(self.seeds.shape[0], self.k, generator)

    @torch.no_grad()
    def build(self, net, base: ManifestDataset, batch_size: int, device: torch.device, autocast,
              ctx: DistContext | None = None, num_workers: int = 0, from_trunk: bool = False) -> FrozenFeatureCache:
        """Embed every slot with the frozen adapters (all but ``net.tasks[-1]``); ranks split the work.

        ``from_trunk``: ``base`` is already slot-indexed and yields the slots' trunk tokens
        (:class:`lorax.continual.trunk_cache.TokenSlotDataset`), so only the adapted blocks run."""
        ctx = ctx or DistContext()
        old = list(net.tasks[:-1])
        if not old:
            raise ValueError("the feature cache needs at least one frozen adapter (task index >= 1)")
        mine = list(range(ctx.rank, self.n_slots, ctx.world))
        ds = base if from_trunk else self.dataset(base)
        loader = DataLoader(ds, batch_size=batch_size, sampler=mine, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        emb = torch.zeros(self.n_slots, len(old), net.embed_dim, device=device)
        was_training = net.training
        net.eval()
        for x, _, slots in loader:
            with autocast:
                x = x.to(device, non_blocking=True)
                e = net.branch(x, old) if from_trunk else net.embeddings(x, old)  # (t-1, B, D)
            emb[slots.to(device)] = e.permute(1, 0, 2).float()
        net.train(was_training)
        self.emb = ctx.all_reduce_sum(emb).cpu()  # every slot was filled by exactly one rank
        if device.type == "cuda":
            self.emb = self.emb.pin_memory()
        log.info("feature cache: %d rows x %d crops x %d frozen adapters (%.1f MB)", self.seeds.shape[0], self.k,
                 len(old), self.emb.numel() * 4 / 2**20)
        return self

    def lookup(self, slots: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Cached embeddings of a batch's slots as (t - 1, B, D) on ``device`` (``old_emb`` of the forward)."""
        if self.emb is None:
            raise RuntimeError("feature cache not built")
        return self.emb[slots.cpu()].to(device, non_blocking=True).permute(1, 0, 2)


def wants_feature_cache(method, params) -> bool:
    """On when ``train.feature_cache`` is set, the method keeps frozen per-task adapters and one of them exists."""
    if not params.train.feature_cache:
        return False
    if not method.frozen_task_adapters:
        log.info("train.feature_cache: method %s has no frozen per-task adapters; training without the cache",
                 method.name)
        return False
    return len(method.tasks) > 1
