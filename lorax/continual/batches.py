"""Images to device batches for training and inference: the device policy, autocast, the rows as a dataset
(decode cache, eval crops, the resampling control) and the seeded loader that every rank shares.
"""

from __future__ import annotations

from contextlib import nullcontext

import pandas as pd
import torch

from lorax.config import Params
from lorax.continual import distributed
from lorax.continual.feature_cache import FrozenFeatureCache
from lorax.continual.methods import Method
from lorax.data.dataset import ManifestDataset, Resample, SeededSampler


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
    bb = getattr(method, "net", method)
    bb = getattr(bb, "backbone", None) or method.backbones[0]
    return bb.info.mean, bb.info.std


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


def loader_for(df: pd.DataFrame, method: Method, params: Params, train: bool, seed: int, batch_size: int | None = None,
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
    bs = batch_size or (params.train.batch_size if train else params.eval.batch_size)
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
