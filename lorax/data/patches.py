"""Native-resolution patches for the trace experts (:mod:`lorax.models.trace`): nothing on this path resizes.

An image is decoded as stored (the same safe loader, RGB rules and sha256 check as :mod:`lorax.data.dataset`, or
the uint8 decode cache, which holds the same pixels) and ``n`` boxes of ``p`` px are cut out of it. An image smaller
than ``p`` on a side is extended at its bottom / right by mirror padding (``numpy.pad`` ``symmetric``) to ``p``:
its own pixels keep their coordinates and values, nothing is interpolated. Training boxes are drawn uniformly from
a seed (the image's content seed, :func:`lorax.features.views.content_seeds`, so a view is the same in every task,
run and process); evaluation uses the fixed grid of :func:`lorax.data.dataset.crop_boxes`. The shortcut controls
(``resample``: a resized or JPEG re-encoded image) are the only change of pixels, applied to the whole image first,
as in every other evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lorax.data.dataset import Box, ManifestDataset, Resample, crop_boxes, resample_array, resampled_size
from lorax.data.images import BadImage, DataError, open_image, read_bytes, to_rgb_array
from lorax.data.manifest import ManifestError, changed_message, file_sha256, mismatch


def padded_size(width: int, height: int, p: int) -> tuple[int, int]:
    """(width, height) after the mirror padding of an image smaller than the patch."""
    return max(int(width), p), max(int(height), p)


def pad_to_patch(img: np.ndarray, p: int) -> np.ndarray:
    """HxWx3 -> at least p x p: mirror-padded at the bottom / right (its own pixels unchanged); else ``img`` itself."""
    h, w = img.shape[:2]
    if h >= p and w >= p:
        return img
    return np.pad(img, ((0, max(0, p - h)), (0, max(0, p - w)), (0, 0)), mode="symmetric")


def train_boxes(width: int, height: int, p: int, n: int, seed: int) -> list[Box]:
    """``n`` uniformly drawn ``p`` px boxes (of the padded image) from ``seed``."""
    w, h = padded_size(width, height, p)
    rng = np.random.default_rng(int(seed))
    lefts, tops = rng.integers(0, w - p + 1, n), rng.integers(0, h - p + 1, n)
    return [(int(x), int(y), int(x) + p, int(y) + p) for x, y in zip(lefts, tops, strict=True)]


def grid_boxes(width: int, height: int, p: int, n: int) -> list[Box]:
    """The evaluation's ``n`` fixed ``p`` px boxes (of the padded image): :func:`crop_boxes`'s grid."""
    return crop_boxes(*padded_size(width, height, p), p, n)


def control_size(width: int, height: int, control: Resample | None) -> tuple[int, int]:
    """The image's size under a shortcut control (resized; JPEG keeps the size)."""
    if control is None or control[1].startswith("jpeg"):
        return int(width), int(height)
    return resampled_size(int(width), int(height), control[0])


def cut(img: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """(n, p, p, 3) uint8: the boxes of ``img`` (padded by :func:`pad_to_patch` when smaller than a box)."""
    p = boxes[0][2] - boxes[0][0]
    img = pad_to_patch(img, p)
    return np.stack([img[t:b, l:r] for l, t, r, b in boxes])


def patch_tensor(img: np.ndarray, boxes: list[Box]) -> torch.Tensor:
    """(n, 3, p, p) uint8: :func:`cut`'s boxes channel-first, what a trace expert reads (evaluation and serving)."""
    return torch.from_numpy(np.ascontiguousarray(cut(img, boxes).transpose(0, 3, 1, 2)))


class NativePatches(Dataset):
    """Item ``i`` -> ((n, 3, p, p) uint8 patches of row ``rows[i]`` at ``boxes[i]``, i).

    ``base``: the rows' :class:`ManifestDataset` (its paths and sha256; its decode ``cache`` when it has one),
    ``resample``: a shortcut control applied to the whole decoded image first."""

    def __init__(self, base: ManifestDataset, rows: list[int], boxes: list[list[Box]],
                 resample: Resample | None = None) -> None:
        self.base, self.rows, self.boxes, self.resample = base, rows, boxes, resample

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, row: int) -> np.ndarray:
        """Row ``row``'s whole HxWx3 uint8 image as stored (then the control, if any)."""
        cache: Any = getattr(self.base, "cache", None)
        if cache is not None:
            img = cache.image(row)
        else:
            path = self.base.paths[row]
            try:
                data = read_bytes(path)
                found = file_sha256(data)
                if found != self.base.sha256[row]:
                    raise ManifestError(changed_message([mismatch(self.base.row_name(row), found,
                                                                  self.base.sha256[row])]))
                img = to_rgb_array(open_image(data, self.base.max_image_pixels, name=path), path)
            except BadImage as e:
                raise DataError(f"{e}; did the file change since preparation? re-run `lorax data prepare`") from None
        if self.resample is not None:
            img = resample_array(np.asarray(img), *self.resample)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return patch_tensor(self.image(self.rows[i]), self.boxes[i]), i


def sizes(df: pd.DataFrame) -> list[tuple[int, int]]:
    """The rows' (width, height) from the manifest (no image decoded to name a view)."""
    return list(zip(df["width"].astype(int), df["height"].astype(int), strict=True))
