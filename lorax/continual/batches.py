"""Images to device batches for training and inference: the device policy, autocast, the rows as a dataset
(decode cache, eval crops, the resampling control), the seeded loader that every rank shares, and one task's
training batches from whichever cache applies (:class:`BatchSource`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lorax.config import Params
from lorax.continual import distributed
from lorax.continual.feature_cache import FrozenFeatureCache, wants_feature_cache
from lorax.continual.methods import Method
from lorax.continual.trunk_cache import TokenSlotDataset, TrunkCache, content_seeds, open_trunk_cache, train_ids
from lorax.data.dataset import ManifestDataset, Resample, SeededSampler
from lorax.data.manifest import verify_files

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} asked for but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def autocast(params: Params, device: torch.device):
    if params.train.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def image_norm(method: Method) -> tuple[tuple[float, ...], tuple[float, ...]]:
    info = method.base_backbone().info
    return info.mean, info.std


def dataset_for(df: pd.DataFrame, method: Method, params: Params, train: bool, seed: int,
             n_crops: int = 1, resample: Resample | None = None) -> ManifestDataset:
    """The rows as a dataset (``n_crops``: eval crops stacked per row; ``resample``: the shortcut control); pixels
    from the uint8 decode cache when ``train.decode_cache`` is on and they fit (never resampled ones)."""
    mean, std = image_norm(method)
    links = params.data.follow_links
    kw = dict(train=train, crop=params.model.img_size, mean=mean, std=std, seed=seed, n_crops=n_crops,
              follow_links=links)
    if resample is not None:
        return ManifestDataset(df, resample=resample, **kw)
    if params.train.decode_cache:
        from lorax.data.cache import CachedManifestDataset, open_decode_cache

        t = params.train
        cache = open_decode_cache(df, t.decode_cache_dir, t.decode_cache_max_mb, follow_links=links)
        if cache is not None:
            return CachedManifestDataset(df, cache, **kw)
    return ManifestDataset(df, **kw)


def loader_for(df: pd.DataFrame, method: Method, params: Params, train: bool, seed: int,
               ctx: distributed.DistContext | None = None, cache: FrozenFeatureCache | None = None,
               device: torch.device | None = None, n_crops: int = 1,
               resample: Resample | None = None) -> torch.utils.data.DataLoader:
    """Batches of ``(images, class_ids, rows)`` (``cache``: cache slots instead of rows); same batches and crops
    as ``make_loader(seed=seed)``, whatever ``num_workers``; under DDP this rank's share of each global batch."""
    ctx = ctx or distributed.DistContext()
    ds = dataset_for(df, method, params, train, seed, n_crops, resample)
    gen = torch.Generator().manual_seed(seed)
    if cache is not None:
        ds, sampler = cache.dataset(ds), cache.sampler(gen)
    else:
        sampler = SeededSampler(len(ds), shuffle=train, generator=gen)
    bs = params.train.batch_size if train else params.eval.batch_size
    workers = params.train.num_workers
    return torch.utils.data.DataLoader(
        ds, batch_sampler=distributed.ShardedBatchSampler(sampler, bs, ctx.rank, ctx.world), num_workers=workers,
        generator=gen, persistent_workers=workers > 0, pin_memory=device is not None and device.type == "cuda",
    )


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a sync; channels-last images on CUDA (faster patch-embedding convolutions)."""
    if device.type == "cuda" and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


@dataclass
class Batch:
    """One training step's share of a batch: ``method(**inputs)`` gives the outputs ``method.loss`` compares with
    ``targets``; ``n_mine`` of the rows are this rank's own, and its loss counts ``weight`` of the global batch."""

    inputs: dict[str, Any]
    targets: torch.Tensor
    n_mine: int
    weight: float


class BatchSource:
    """One task's training batches, from whichever cache applies, so the training loop only calls the model.

    * no cache: random crops of the images, a new one every epoch;
    * ``train.feature_cache`` (LoRAX after its first task): ``train.feature_cache_crops`` fixed crops per image for
      the task, the frozen adapters' embeddings of each computed once; a step runs only the newest adapter
      (``inputs`` carry ``old_emb``);
    * ``train.trunk_cache`` (LoRAX with a frozen trunk): the same fixed crops, drawn from each image's content so
      they are the same in every task and run, their frozen-trunk tokens read from disk; a step runs only the
      adapted blocks (``inputs`` carry the tokens and ``from_trunk``).
    """

    def __init__(self, rows: pd.DataFrame, method: Method, params: Params, seed: int, device: torch.device,
                 ctx: distributed.DistContext) -> None:
        self.rows, self.method, self.params, self.device, self.ctx = rows, method, params, device, ctx
        self.slots: FrozenFeatureCache | None = None
        self.tokens: TokenSlotDataset | None = None
        trunk = open_trunk_cache(method, params, device)  # frozen blocks' tokens of the fixed crops, on disk
        old_cached = wants_feature_cache(method, params)  # old adapters' embeddings of the fixed crops, per task
        if old_cached or trunk is not None:  # K fixed crops per row for the whole task
            k = params.train.feature_cache_crops  # the trunk cache needs them drawn from each image's content
            self.slots = FrozenFeatureCache(len(rows), k, seed, content_seeds(rows, k) if trunk is not None else None)
            base = dataset_for(rows, method, params, True, seed)
            if trunk is not None:
                self.tokens = self._trunk_tokens(trunk, base)
            if old_cached:
                self.slots.build(method.net, self.tokens if self.tokens is not None else base,
                                 params.eval.batch_size, device, autocast(params, device), ctx,
                                 params.train.num_workers, from_trunk=self.tokens is not None)
        self.steps = len(self._loader(seed))

    def _trunk_tokens(self, trunk: TrunkCache, base: ManifestDataset) -> TokenSlotDataset:
        """The slots' trunk tokens: the missing ones computed (ranks split them) and stored; rows whose every crop
        was found are not decoded, so their files are checked against the manifest here."""
        params, ctx, slots = self.params, self.ctx, self.slots
        ids = train_ids(base, self.rows, slots.seeds)
        missing = ~trunk.found(ids)
        verify_files(self.rows[~missing.reshape(-1, slots.k).any(1)], params.data.follow_links)
        todo = np.flatnonzero(missing)
        if len(todo):
            mine = todo[ctx.rank::ctx.world].tolist()
            loader = torch.utils.data.DataLoader(slots.dataset(base), batch_size=params.eval.batch_size,
                                                 sampler=mine, num_workers=params.train.num_workers)
            t0 = time.time()
            trunk.fill(self.method.net, loader, ids, self.device, autocast(params, self.device), desc="trunk cache")
            ctx.barrier()
            trunk.refresh()  # the other ranks' shards
            log.info("trunk cache: %d of %d crops computed (%.1f s), %d reused", len(todo), len(ids),
                     time.time() - t0, len(ids) - len(todo))
        else:
            log.info("trunk cache: all %d crops reused", len(ids))
        return TokenSlotDataset(trunk, ids, self.rows["class_id"].to_numpy(dtype=np.int64))

    def _loader(self, seed: int) -> torch.utils.data.DataLoader:
        """One epoch's batches of ``(images or tokens, class ids, rows or slots)``, shuffled by ``seed``."""
        params, ctx = self.params, self.ctx
        if self.tokens is None:
            return loader_for(self.rows, self.method, params, train=True, seed=seed, ctx=ctx, cache=self.slots,
                              device=self.device)
        gen = torch.Generator().manual_seed(seed)
        workers = params.train.num_workers
        sampler = distributed.ShardedBatchSampler(self.slots.sampler(gen), params.train.batch_size, ctx.rank,
                                                  ctx.world)
        return torch.utils.data.DataLoader(self.tokens, batch_sampler=sampler, num_workers=workers, generator=gen,
                                           persistent_workers=workers > 0, pin_memory=self.device.type == "cuda")

    def __len__(self) -> int:
        """Steps per epoch."""
        return self.steps

    def epoch(self, seed: int) -> Iterator[Batch]:
        """The batches of one epoch, on the device, shuffled (and cropped) by ``seed``."""
        loader = self._loader(seed)
        # Opening the loader draws a base seed from the generator its sampler shares, so the shuffle and the crops
        # depend on how often it is opened: once before iterating, as the runs in docs/results.md did (their
        # progress bar opened it), keeps every earlier run's batches, and so its accuracy matrix, reproducible.
        iter(loader)
        old = self.slots is not None and self.slots.emb is not None
        for step, (x, y, key) in enumerate(loader):
            inputs: dict[str, Any] = {"x": to_device(x, self.device)}
            if old:
                inputs["old_emb"] = self.slots.lookup(key, self.device)
            if self.tokens is not None:
                inputs["from_trunk"] = True
            n_mine, weight = loader.batch_sampler.share(step)  # DDP: this rank's share of the global batch
            yield Batch(inputs, y.to(self.device, non_blocking=True), n_mine, weight)
