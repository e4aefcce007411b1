"""Images to device batches for training and inference: the device policy, autocast, the rows as a dataset
(decode cache, eval crops, the resampling control) and the seeded loader that every rank shares. One task's training
batches are :class:`lorax.continual.batch_source.BatchSource`.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import pandas as pd
import torch

from lorax.config import Params
from lorax.continual import distributed
from lorax.continual.methods import Method
from lorax.data.dataset import ManifestDataset, Resample, SeededSampler

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
    from the uint8 decode cache when ``cache.decode`` is on and they fit (never resampled ones)."""
    mean, std = image_norm(method)
    links = params.data.follow_links
    kw = dict(train=train, crop=params.model.img_size, mean=mean, std=std, seed=seed, n_crops=n_crops,
              follow_links=links)
    if resample is not None:
        return ManifestDataset(df, resample=resample, **kw)
    if params.cache.decode:
        from lorax.data.cache import CachedManifestDataset, open_decode_cache
        from lorax.features import decode_dir

        cache = open_decode_cache(df, decode_dir(params.cache), params.cache.decode_max_mb, follow_links=links)
        if cache is not None:
            return CachedManifestDataset(df, cache, **kw)
    return ManifestDataset(df, **kw)


def loader_for(df: pd.DataFrame, method: Method, params: Params, train: bool, seed: int,
               ctx: distributed.DistContext | None = None, device: torch.device | None = None, n_crops: int = 1,
               resample: Resample | None = None) -> torch.utils.data.DataLoader:
    """Batches of ``(images, class_ids, rows)``; same batches and crops as ``make_loader(seed=seed)``, whatever
    ``num_workers``; under DDP this rank's share of each global batch."""
    ctx = ctx or distributed.DistContext()
    ds = dataset_for(df, method, params, train, seed, n_crops, resample)
    gen = torch.Generator().manual_seed(seed)
    sampler = SeededSampler(len(ds), shuffle=train, generator=gen)
    return sharded_loader(ds, sampler, params.train.batch_size if train else params.eval.batch_size, params, ctx, gen,
                   device)


def sharded_loader(ds: torch.utils.data.Dataset, sampler: torch.utils.data.Sampler, bs: int, params: Params,
            ctx: distributed.DistContext, gen: torch.Generator,
            device: torch.device | None) -> torch.utils.data.DataLoader:
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
