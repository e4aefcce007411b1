"""Views: the exact pixels a model is fed from an image, named so a stored tensor can be found again.

A view is one crop box of the (possibly re-encoded) image, with its flip. Training uses ``train.views`` fixed views
per image, drawn from the image's own content digest (:func:`content_seeds`), so an image gets the same views in
every task, run and process whether or not anything is cached; evaluation uses the fixed grid of ``eval.crops``
boxes (:func:`lorax.data.dataset.crop_boxes`). ``control`` (scale, filter): the image resized or JPEG re-encoded
before cropping (the shortcut controls); the detector adds its augmentation's draw. A view's id hashes the image's
sha256 and all of that, so equal ids mean equal pixels (:mod:`lorax.features.store`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lorax.data.dataset import ManifestDataset, Resample, crop_boxes, resampled_size


def image_digests(df: pd.DataFrame) -> list[str]:
    """The rows' sha256 (the bytes the loaders verify), with one clear line when the column is missing or odd."""
    if "sha256" not in df.columns:
        raise ValueError("manifest lacks the sha256 column; re-run `lorax data prepare`")
    out = df["sha256"].astype(str).tolist()
    if any(len(h) != 64 or not all(c in "0123456789abcdef" for c in h.lower()) for h in out):
        raise ValueError("manifest sha256 values are not 64 hex digits; re-run `lorax data prepare`")
    return out


def view_id(digest: str, view: dict[str, Any]) -> bytes:
    """32-byte id of one view of one image."""
    return hashlib.sha256(bytes.fromhex(digest) + json.dumps(view, sort_keys=True).encode()).digest()


def content_seeds(digests: list[str], k: int) -> np.ndarray:
    """(rows, k) crop seeds from each image's sha256 and the view index: the same k views of an image everywhere."""
    return np.array([[int.from_bytes(hashlib.sha256(f"{d}:{j}".encode()).digest()[:8], "little") & (2**62 - 1)
                      for j in range(k)] for d in digests], dtype=np.int64).reshape(len(digests), k)


@dataclass(frozen=True)
class Views:
    """``k`` views of each of a frame's rows; slot ``row * k + j``. ``seeds`` (rows, k): the training views' crop
    seeds (None: the eval grid, every row's k crops decoded together)."""

    ids: np.ndarray  # (rows * k, 32) uint8
    k: int
    seeds: np.ndarray | None = None
    control: Resample | None = None

    @property
    def rows(self) -> int:
        return len(self.ids) // self.k


def _ids(items: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(items), dtype=np.uint8).reshape(-1, 32).copy()


def train_views(df: pd.DataFrame, ds: ManifestDataset, k: int) -> Views:
    """``k`` fixed training views per row: the box and flip ``ds`` (a train dataset) draws for each content seed,
    from the manifest's width and height, so no image is decoded to name them."""
    digests = image_digests(df)
    seeds = content_seeds(digests, k)
    items = []
    for r, (d, w, h) in enumerate(zip(digests, df["width"].astype(int), df["height"].astype(int), strict=True)):
        for j in range(k):
            boxes, flip = ds._boxes(int(w), int(h), np.random.default_rng(int(seeds[r, j])), ds.paths[r])
            items.append(view_id(d, {"box": list(boxes[0]), "flip": flip}))
    return Views(_ids(items), k, seeds)


def eval_views(df: pd.DataFrame, crop: int, n_crops: int, control: Resample | None = None) -> Views:
    """The ``n_crops`` evaluation crops of every row (``control``: of the resized / re-encoded image)."""
    items = []
    for d, w, h in zip(image_digests(df), df["width"].astype(int), df["height"].astype(int), strict=True):
        extra: dict[str, Any] = {}
        if control is not None:
            w, h = resampled_size(int(w), int(h), control[0]) if not control[1].startswith("jpeg") else (w, h)
            extra = {"control": [float(control[0]), str(control[1])]}
        items += [view_id(d, {"box": list(b), "flip": False, **extra}) for b in crop_boxes(int(w), int(h), crop,
                                                                                          n_crops)]
    return Views(_ids(items), n_crops, None, control)


class _Crops(torch.utils.data.Dataset):
    """Item i of ``items`` -> (its crops (n, C, H, W), item): a training slot (one view) or an eval row (k)."""

    def __init__(self, ds: ManifestDataset, views: Views, items: list[int]) -> None:
        self.ds, self.views, self.items = ds, views, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        if self.views.seeds is not None:
            row, j = divmod(item, self.views.k)
            return self.ds[(row, int(self.views.seeds[row, j]))][0].unsqueeze(0), item
        x = self.ds[item][0]
        return (x if x.dim() == 4 else x.unsqueeze(0)), item


def view_batches(fn: Callable[[torch.Tensor], torch.Tensor], ds: ManifestDataset, views: Views,
                 positions: np.ndarray, batch_size: int, device: torch.device, num_workers: int = 0,
                 desc: str = "features") -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``fn`` (a batch of crops on ``device`` -> one value per crop) over the views at ``positions`` (slots into
    ``views.ids``), as the ``(positions, values)`` batches :meth:`FeatureStore.get_or_compute` stores. Eval rows
    are decoded once for all their crops; only the asked positions are yielded."""
    from tqdm.auto import tqdm

    positions = np.asarray(positions)
    k = views.k
    per_slot = views.seeds is not None
    items = positions.tolist() if per_slot else sorted(set((positions // k).tolist()))
    want = set(positions.tolist())
    loader = torch.utils.data.DataLoader(_Crops(ds, views, items), batch_size=max(1, batch_size // (1 if per_slot
                                         else k)), num_workers=num_workers)
    for x, item in tqdm(loader, desc=desc, leave=False, disable=None):
        n = x.shape[1]
        slots = (item.view(-1, 1) * (1 if per_slot else k) + torch.arange(n).view(1, -1)).reshape(-1).numpy()
        with torch.no_grad():
            out = fn(x.flatten(0, 1).to(device, non_blocking=True))
        keep = np.fromiter((s in want for s in slots), dtype=bool, count=len(slots))
        if keep.any():
            yield slots[keep], out[torch.from_numpy(keep).to(out.device)].float().cpu()
