"""Decode every image once into a uint8 memory-mapped cache; loaders cut their crops out of it.

With small backbones the input pipeline, not the model, sets the pace: every epoch re-reads and re-inflates each
PNG/JPEG and converts it to RGB. The decode cache does that once. The pixels of a group of manifest rows (one
task's split, or the replayed exemplars) are written back to back as HxWx3 uint8 into ``pixels.u8`` with an
``index.npy`` of (offset, height, width) per row; loaders open it with ``np.memmap``, so the OS page cache, not the
Python heap, holds it and DataLoader workers share it.

A shard is keyed by the sha256 of its rows (root, path, content hash, size) and the decoder settings, so a changed
file or manifest gets a new shard and a stale one is never read. Building a shard checks each file's bytes (read
once, for decoding) against the manifest's ``sha256`` and refuses the rows that differ, so a shard only ever holds
the content its manifest records; an existing shard was checked when it was built and is not read again. Shards are written to a temporary folder and
renamed, so concurrent builders (DDP ranks, parallel stages) never see half a shard.

Crops are identical to decoding each file (:class:`~lorax.data.dataset.ManifestDataset`): the RGB rules are per
pixel, so converting the whole image and slicing the box gives the pixels of cropping first, and the crop boxes
come from the same seeded generator calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lorax.data.dataset import HALF, ManifestDataset
from lorax.data.images import DEFAULT_MAX_PIXELS, BadImage, DataError, open_image, read_bytes, to_rgb_array
from lorax.data.manifest import ManifestError, changed_message, file_sha256, mismatch, row_names, safe_paths

log = logging.getLogger(__name__)

FORMAT = 1
GROUP_COLUMNS = ("root", "task", "split")


def decoded_bytes(df: pd.DataFrame) -> int:
    """Bytes the decoded RGB pixels of ``df`` take (from the manifest's width/height)."""
    if not {"width", "height"} <= set(df.columns):
        raise DataError("manifest lacks width/height columns; re-run `lorax data prepare`")
    return int((df["width"].astype(np.int64) * df["height"].astype(np.int64) * 3).sum())


def shard_key(df: pd.DataFrame, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Content key of a group of rows: a changed file (hash, size), row or decoder setting gives a new key."""
    h = hashlib.sha256(f"lorax-decode-cache:{FORMAT}:{max_image_pixels}\n".encode())
    cols = [c for c in ("root", "path", "sha256", "width", "height") if c in df.columns]
    for row in df[cols].itertuples(index=False):
        h.update(("\t".join(str(v) for v in row) + "\n").encode())
    return h.hexdigest()[:32]


class Shard:
    """One cached group of rows: ``image(i)`` is row ``i``'s HxWx3 uint8 pixels (a read-only memmap view)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.index = np.load(self.directory / "index.npy")  # (n, 3) int64: offset, height, width
        self._mm: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _pixels(self) -> np.memmap:
        if self._mm is None:  # opened lazily, so a pickled dataset (DataLoader worker) maps it itself
            self._mm = np.memmap(self.directory / "pixels.u8", dtype=np.uint8, mode="r")
        return self._mm

    def image(self, i: int) -> np.ndarray:
        off, h, w = (int(v) for v in self.index[i])
        return self._pixels()[off : off + h * w * 3].reshape(h, w, 3)

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "index": self.index, "_mm": None}

    @classmethod
    def build(cls, df: pd.DataFrame, directory: str | Path, max_image_pixels: int = DEFAULT_MAX_PIXELS,
              follow_links: bool = False) -> Shard:
        """Decode the rows of ``df`` into ``directory`` (atomically: temp folder, then rename), after checking
        every file against the manifest's ``sha256`` (:class:`ManifestError` naming the rows that changed)."""
        directory = Path(directory)
        if (directory / "meta.json").is_file():
            return cls(directory)
        if "sha256" not in df.columns:
            raise DataError("manifest lacks the sha256 column; re-run `lorax data prepare`")
        paths = safe_paths(df, allow_links=follow_links)
        tmp = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        index = np.zeros((len(df), 3), dtype=np.int64)
        off = 0
        changed: list[str] = []
        names = row_names(df, paths)
        with open(tmp / "pixels.u8", "wb") as f:
            for i, (path, expected) in enumerate(zip(paths, df["sha256"].astype(str), strict=True)):
                try:
                    data = read_bytes(path)
                    found = file_sha256(data)
                    if found != expected:  # named with the others at the end; nothing of it is decoded
                        changed.append(mismatch(names[i], found, expected))
                        continue
                    a = to_rgb_array(open_image(data, max_image_pixels, name=path), path)
                except BadImage as e:
                    shutil.rmtree(tmp, ignore_errors=True)
                    msg = f"{e}; did the file change since preparation? re-run `lorax data prepare`"
                    raise DataError(msg) from None
                except OSError as e:
                    shutil.rmtree(tmp, ignore_errors=True)
                    msg = f"{path}: cannot decode ({e}); re-run `lorax data prepare` to quarantine it"
                    raise DataError(msg) from None
                f.write(np.ascontiguousarray(a).tobytes())
                index[i] = (off, a.shape[0], a.shape[1])
                off += a.size
        if changed:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ManifestError(changed_message(changed))
        np.save(tmp / "index.npy", index)
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "rows": len(df), "bytes": off,
                                                   "max_image_pixels": max_image_pixels}))
        try:
            tmp.rename(directory)
        except OSError:  # another process finished the same shard first: its content is the same
            shutil.rmtree(tmp, ignore_errors=True)
            if not (directory / "meta.json").is_file():
                raise
        return cls(directory)


class DecodeCache:
    """The shards holding every row of one manifest table, and the (shard, position) of each row."""

    def __init__(self, shards: list[Shard], where: np.ndarray) -> None:
        self.shards = shards
        self.where = where  # (n_rows, 2): shard number, position in the shard

    def __len__(self) -> int:
        return len(self.where)

    def image(self, i: int) -> np.ndarray:
        s, j = self.where[i]
        return self.shards[int(s)].image(int(j))


def _groups(df: pd.DataFrame) -> list[np.ndarray]:
    cols = [c for c in GROUP_COLUMNS if c in df.columns]
    if not cols:
        return [np.arange(len(df))]
    keys = df[cols].astype(str).agg("\t".join, axis=1).to_numpy()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in np.argsort(first)]


def open_decode_cache(
    df: pd.DataFrame,
    cache_dir: str | Path,
    max_mb: float,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    follow_links: bool = False,
) -> DecodeCache | None:
    """The decode cache of ``df``'s rows (building missing shards), or None when it does not fit.

    Rows are grouped by (root, task, split) so the shards of a task's train and val splits are shared by every
    table that holds them (the growing evaluation set, later tasks); replayed exemplars form small shards of their own.
    """
    df = df.reset_index(drop=True)
    need = decoded_bytes(df)
    if need > max_mb * 2**20:
        log.info("decode cache: %d images need %.0f MB > cache.decode_max_mb=%s; reading the files instead",
                 len(df), need / 2**20, max_mb)
        return None
    cache_dir = Path(cache_dir)
    shards, where = [], np.zeros((len(df), 2), dtype=np.int64)
    for rows in _groups(df):
        part = df.iloc[rows]
        directory = cache_dir / shard_key(part, max_image_pixels)
        if not (directory / "meta.json").is_file():
            log.info("decode cache: decoding %d images into %s", len(part), directory)
        shard = Shard.build(part, directory, max_image_pixels, follow_links)
        if len(shard) != len(part):
            raise DataError(f"{directory}: decode cache holds {len(shard)} rows, expected {len(part)}; delete it")
        where[rows, 0] = len(shards)
        where[rows, 1] = np.arange(len(rows))
        shards.append(shard)
    return DecodeCache(shards, where)


class CachedManifestDataset(ManifestDataset):
    """:class:`ManifestDataset` whose pixels come from a :class:`DecodeCache` (same crops, no decoding)."""

    def __init__(
        self,
        df: pd.DataFrame,
        cache: DecodeCache,
        train: bool,
        crop: int,
        mean: Sequence[float] = HALF,
        std: Sequence[float] = HALF,
        n_crops: int = 1,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        seed: int = 0,
        follow_links: bool = False,
    ) -> None:
        super().__init__(df, train, crop, mean, std, n_crops=n_crops, max_image_pixels=max_image_pixels, seed=seed,
                         follow_links=follow_links)
        if len(cache) != len(self):
            raise ValueError(f"decode cache holds {len(cache)} rows, the manifest {len(self)}")
        self.cache = cache

    def load(self, i: int, seed: int | None = None) -> list[np.ndarray]:
        img = self.cache.image(i)
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        h, w = img.shape[:2]
        boxes, flip = self._boxes(w, h, rng, self.paths[i])
        crops = []
        for left, top, right, bottom in boxes:
            a = img[top:bottom, left:right]
            crops.append(a[:, ::-1] if flip else a)
        return crops
