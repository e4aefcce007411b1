"""The trace experts' views and their frozen embeddings, through the feature store (:mod:`lorax.features.store`).

A trace view is the set of ``trace.patches`` boxes of ``trace.patch`` px an expert reads from one image at native
resolution (:mod:`lorax.data.patches`): ``k`` per training row, drawn from the image's content seeds (the same in
every task, run and process), one fixed grid per evaluated row. Its id hashes the image's sha256, the boxes and the
shortcut control, like :mod:`lorax.features.views`. Each frozen expert is a producer keyed by its tensors and the
``trace:`` settings (:func:`expert_producer`), so an old expert never runs over an image view twice: training reads
the old experts' embeddings of every view, evaluation, exemplar selection and the head fits read every expert's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lorax.config import Params
from lorax.continual.batches import autocast
from lorax.continual.frozen_parts import compute_tag
from lorax.data.dataset import Box, ManifestDataset, Resample
from lorax.data.manifest import verify_files
from lorax.data.patches import NativePatches, control_size, grid_boxes, sizes, train_boxes
from lorax.features.store import FeatureStore, producer_key
from lorax.features.views import content_seeds, image_digests, view_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceViews:
    """Slot ``row * k + j``: the view's id, its row and its boxes (``control``: the shortcut control's image)."""

    ids: np.ndarray  # (rows * k, 32) uint8
    k: int
    rows: list[int]
    boxes: list[list[Box]]
    control: Resample | None = None


def _ids(items: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(items), dtype=np.uint8).reshape(-1, 32).copy()


def trace_train_views(df: pd.DataFrame, params: Params, k: int) -> TraceViews:
    """``k`` fixed training views per row, drawn from each image's content seeds."""
    p, n = params.trace.patch, params.trace.patches
    digests = image_digests(df)
    seeds = content_seeds(digests, k)
    items, rows, boxes = [], [], []
    for r, (d, (w, h)) in enumerate(zip(digests, sizes(df), strict=True)):
        for j in range(k):
            b = train_boxes(w, h, p, n, int(seeds[r, j]))
            items.append(view_id(d, {"trace": [list(x) for x in b]}))
            rows.append(r)
            boxes.append(b)
    return TraceViews(_ids(items), k, rows, boxes)


def trace_eval_views(df: pd.DataFrame, params: Params, control: Resample | None = None) -> TraceViews:
    """One view per row: the fixed grid of patches (of the resized / re-encoded image under ``control``)."""
    p, n = params.trace.patch, params.trace.patches
    items, boxes = [], []
    extra = {"control": [float(control[0]), str(control[1])]} if control is not None else {}
    for d, (w, h) in zip(image_digests(df), sizes(df), strict=True):
        b = grid_boxes(*control_size(w, h, control), p, n)
        items.append(view_id(d, {"trace": [list(x) for x in b], **extra}))
        boxes.append(b)
    return TraceViews(_ids(items), 1, list(range(len(df))), boxes, control)


def native_dataset(df: pd.DataFrame, params: Params) -> ManifestDataset:
    """The rows' files (paths, sha256) as the patch reader opens them: from the uint8 decode cache when
    ``cache.decode`` is on and they fit (the same pixels), else from the files, checked against the manifest."""
    kw = dict(train=False, crop=params.trace.patch, follow_links=params.data.follow_links)
    if params.cache.decode:
        from lorax.data.cache import CachedManifestDataset, open_decode_cache
        from lorax.features import decode_dir

        cache = open_decode_cache(df, decode_dir(params.cache), params.cache.decode_max_mb,
                                  follow_links=params.data.follow_links)
        if cache is not None:
            return CachedManifestDataset(df, cache, **kw)
    return ManifestDataset(df, **kw)


def view_patches(ds: ManifestDataset, views: TraceViews) -> NativePatches:
    """Slot -> the view's (patches, slot)."""
    return NativePatches(ds, views.rows, views.boxes, views.control)


def expert_producer(method: Any, params: Params, device: torch.device, task: str) -> tuple[str, dict[str, Any]]:
    """(key, description) of task ``task``'s trace expert: its tensors, the ``trace:`` settings, the precision."""
    settings = {"part": "trace", "task": task, "trace": params.trace.model_dump(mode="json"),
                "compute": compute_tag(device, params.train.amp)}
    return producer_key(settings, method.expert(task).state_dict()), settings


def images_per_batch(params: Params) -> int:
    """Images per expert pass: ``eval.batch_size`` patches' worth (a batch of images is P times as many patches)."""
    return max(1, params.eval.batch_size // params.trace.patches)


def trace_embeddings(method: Any, params: Params, store: FeatureStore, ds: ManifestDataset, df: pd.DataFrame,
                     views: TraceViews, names: list[str], device: torch.device,
                     desc: str = "trace embeddings") -> torch.Tensor:
    """(views, len(names), dim) embeddings of every view by each named (frozen) expert: stored ones read, the
    missing ones computed in one pass over the views missing any (each image decoded once) and stored. Rows none of
    whose views is decoded here have their files checked against the manifest instead."""
    ids, amp = views.ids, autocast(params, device)
    keys = [expert_producer(method, params, device, t) for t in names]
    if not keys:
        return torch.zeros(len(ids), 0, params.trace.dim)
    missing = np.stack([store.producer(k, d).found(ids) for k, d in keys], 1) == 0
    need = np.flatnonzero(missing.any(1))
    decoded = np.zeros(len(df), bool)
    decoded[np.asarray(views.rows, dtype=np.int64)[need]] = True
    verify_files(df.iloc[np.flatnonzero(~decoded)], params.data.follow_links)
    log.info("%s: %d views x %d experts: %d stored, %d to compute", desc, len(ids), len(keys),
             int((~missing).sum()), int(missing.sum()))
    if len(need):
        patches = NativePatches(ds, [views.rows[s] for s in need], [views.boxes[s] for s in need], views.control)
        loader = torch.utils.data.DataLoader(patches, batch_size=images_per_batch(params),
                                             num_workers=params.train.num_workers)
        experts = [method.expert(t) for t in names]
        for e in experts:
            e.eval()
        done: list[tuple[list[np.ndarray], list[torch.Tensor]]] = [([], []) for _ in keys]
        for x, item in loader:
            slots = need[item.numpy()]
            x = x.to(device, non_blocking=True)
            for j, expert in enumerate(experts):
                sel = missing[slots, j]
                if sel.any():
                    with torch.no_grad(), amp:
                        e = expert(x[torch.from_numpy(sel).to(device)]).float().cpu()
                    done[j][0].append(slots[sel])
                    done[j][1].append(e)
        for (key, _), (pos, vals) in zip(keys, done, strict=True):
            if pos:
                store.add(key, ids[np.concatenate(pos)], torch.cat(vals))
    return torch.stack([store.get(k, ids) for k, _ in keys], 1)
