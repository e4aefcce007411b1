"""Torch dataset over a manifest, with crop-not-resize transforms.

The LoRAX paper shows that resizing destroys generator traces, so images are only ever cropped: train = random
crop + horizontal flip, eval = centre crop (or a fixed grid of crops, :func:`multi_crops`). Images are loaded with
:func:`lorax.data.images.open_image` / :func:`~lorax.data.images.to_rgb_array`, the same safe loader and RGB rules
that preparation and ``lorax predict`` use. The crop box is cut before the RGB conversion (all rules are per
pixel, so the result is identical and large images cost less).

Reproducibility: :func:`make_loader` draws, from one seeded ``torch.Generator``, both the shuffling order and a
per-sample crop seed that travels with the index (the sampler yields ``(row, seed)``). The crops therefore depend
only on ``seed`` and the epoch, not on ``num_workers`` or worker scheduling, and a CPU run reproduces exactly.

Trust: rows are opened through :func:`lorax.data.manifest.safe_paths` (no path out of the dataset root), and each
file's bytes, read once for decoding, are checked against the manifest's ``sha256`` before they are used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from lorax.data.images import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    DataError,
    crop_image,
    open_image,
    read_bytes,
    to_rgb_array,
)
from lorax.data.manifest import ManifestError, changed_message, file_sha256, mismatch, row_name, safe_paths

HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip.OPENAI_DATASET_STD

_NORMS = {"half": (HALF, HALF), "imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}

Box = tuple[int, int, int, int]  # left, top, right, bottom
Resample = tuple[float, str]  # (scale, filter): a control's view (eval.resample_control; filter jpegQ: eval.jpeg_control)

_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR}


def resampled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) of an image resized by ``scale``: sides rounded, at least 1 px."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def resample_array(arr: np.ndarray, scale: float, filter: str = "lanczos") -> np.ndarray:
    """An HxWx3 uint8 image resized by ``scale`` (:func:`resampled_size`): the resampling shortcut control, applied
    to the decoded image before any crop, so a model that only learned "resampled means real" is caught.
    ``filter`` ``jpeg<Q>`` (scale 1) re-encodes the image as JPEG quality Q instead (the JPEG control)."""
    if filter.startswith("jpeg"):
        import io

        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(filter[4:]))
        buf.seek(0)
        with Image.open(buf) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    h, w = arr.shape[:2]
    return np.asarray(Image.fromarray(arr).resize(resampled_size(w, h, scale), _FILTERS[filter]), dtype=np.uint8)


def control_views(resample_control: Any, jpeg_control: Any) -> dict[str, Resample]:
    """The evaluation's shortcut controls by name: ``resampled`` (eval.resample_control) and ``jpeg<Q>`` for each
    quality of eval.jpeg_control, each the view every evaluated image is also scored under."""
    views: dict[str, Resample] = {}
    if resample_control is not None:
        views["resampled"] = (float(resample_control.scale), str(resample_control.filter))
    for q in jpeg_control or ():
        views[f"jpeg{int(q)}"] = (1.0, f"jpeg{int(q)}")
    return views


def normalization(name: str, backbone_cfg: Any = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for ``model.normalize``: half (0.5/0.5, upstream LoRAX), imagenet, clip (OpenAI CLIP).

    ``auto`` takes them from ``backbone_cfg``: anything with ``mean``/``std`` attributes or keys (the backbone's
    ``info``, a timm ``pretrained_cfg``).
    """
    if name in _NORMS:
        return _NORMS[name]
    if name == "auto":
        if backbone_cfg is not None:
            get = backbone_cfg.get if isinstance(backbone_cfg, dict) else lambda k: getattr(backbone_cfg, k, None)
            mean, std = get("mean"), get("std")
            if mean is not None and std is not None:
                return tuple(float(m) for m in mean), tuple(float(s) for s in std)
        raise ValueError(
            "model.normalize: 'auto' needs the backbone's config (pass backbone.info or a timm pretrained_cfg "
            "with mean/std); or set model.normalize to one of half, imagenet, clip"
        )
    raise ValueError(f"model.normalize: unknown normalisation {name!r}; allowed: auto, half, imagenet, clip")


def crop_boxes(width: int, height: int, crop: int, n: int = 1) -> list[Box]:
    """A deterministic spread of ``n`` crop boxes: n=1 centre; else evenly spaced on a ceil(sqrt n)^2 grid.

    The grid positions used are spread over the grid (n=4: the four corners, n=5: corners + centre).
    """
    if width < crop or height < crop:
        raise DataError(f"image {width}x{height} is smaller than crop {crop}; crop, never resize")
    if n < 1:
        raise ValueError(f"eval.crops: must be >= 1, got {n}")
    if n == 1:
        left, top = (width - crop) // 2, (height - crop) // 2
        return [(left, top, left + crop, top + crop)]
    g = math.ceil(math.sqrt(n))
    xs = np.round(np.linspace(0, width - crop, g)).astype(int)
    ys = np.round(np.linspace(0, height - crop, g)).astype(int)
    cells = [(int(x), int(y)) for y in ys for x in xs]
    pick = np.round(np.linspace(0, g * g - 1, n)).astype(int)
    return [(cells[i][0], cells[i][1], cells[i][0] + crop, cells[i][1] + crop) for i in pick]


def multi_crops(img: np.ndarray | torch.Tensor, crop: int, n: int) -> np.ndarray | torch.Tensor:
    """``n`` deterministic crops (see :func:`crop_boxes`) of an HxWxC array -> (n, crop, crop, C), or of a CxHxW
    tensor -> (n, C, crop, crop)."""
    if isinstance(img, torch.Tensor):
        h, w = img.shape[-2:]
        return torch.stack([img[..., t:b, l:r] for l, t, r, b in crop_boxes(w, h, crop, n)])
    h, w = img.shape[:2]
    return np.stack([img[t:b, l:r] for l, t, r, b in crop_boxes(w, h, crop, n)])


def to_tensor(arr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 -> normalised float32 3xHxW, ``(x / 255 - mean) / std``.

    Done in numpy as one fused multiply-add on a channel-first copy: small torch ops on a strided view cost
    ~10x more here (thread start-up per op), and this runs once per image.
    """
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32))).reshape(-1, 1, 1)
    shift = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)).reshape(-1, 1, 1)
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    chw *= scale
    chw -= shift
    return torch.from_numpy(chw)


class ManifestDataset(Dataset):
    """Rows of a manifest as ``(image float CxHxW, class_id, row)``; ``row`` is the position in ``df``.

    ``train``: a uniformly random ``crop`` box and a horizontal flip with p=0.5; else the centre crop, or with
    ``n_crops > 1`` a fixed grid of crops stacked as (n, C, H, W). Index with an int, or with ``(row, seed)``
    to fix the random crop (what :func:`make_loader`'s sampler does). ``follow_links``: ``data.follow_links``.
    ``resample``: (scale, filter) resizes every decoded image before cropping (the shortcut control).
    """

    def __init__(
        self,
        df: pd.DataFrame,
        train: bool,
        crop: int,
        mean: Sequence[float] = HALF,
        std: Sequence[float] = HALF,
        n_crops: int = 1,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        seed: int = 0,
        follow_links: bool = False,
        resample: Resample | None = None,
    ) -> None:
        missing = [c for c in ("root", "path", "class_id", "sha256") if c not in df.columns]
        if missing:
            raise DataError(f"manifest lacks columns {missing}; re-run `lorax data prepare`")
        self.paths: list[Path] = safe_paths(df, allow_links=follow_links)
        self.sha256: list[str] = df["sha256"].astype(str).tolist()
        self._tasks = df["task"].tolist() if "task" in df.columns else [None] * len(df)
        self._splits = df["split"].tolist() if "split" in df.columns else [None] * len(df)
        self.class_ids = df["class_id"].to_numpy(dtype=np.int64)
        self.train, self.crop, self.n_crops = train, int(crop), int(n_crops)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_image_pixels = max_image_pixels
        self.resample = resample
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def _boxes(self, w: int, h: int, rng: np.random.Generator | None, path: Path) -> tuple[list[Box], bool]:
        c = self.crop
        if w < c or h < c:
            raise DataError(
                f"{path}: image {w}x{h} is smaller than crop {c}; re-run `lorax data prepare` with this crop "
                "(model.img_size) so such images are quarantined, or lower model.img_size"
            )
        if self.train:
            left = int(rng.integers(0, w - c + 1))
            top = int(rng.integers(0, h - c + 1))
            return [(left, top, left + c, top + c)], bool(rng.random() < 0.5)
        return crop_boxes(w, h, c, self.n_crops), False

    def row_name(self, i: int) -> str:
        """The row as error messages name it (file, task, split)."""
        p = self.paths[i]
        return row_name(str(p.parent), p.name, self._tasks[i], self._splits[i])

    def load(self, i: int, seed: int | None = None) -> list[np.ndarray]:
        """The RGB uint8 crops of row ``i`` (one, or ``n_crops`` in eval)."""
        path = self.paths[i]
        try:
            data = read_bytes(path)
            found = file_sha256(data)  # of the bytes read for decoding: no second read
            if found != self.sha256[i]:
                raise ManifestError(changed_message([mismatch(self.row_name(i), found, self.sha256[i])]))
            img = open_image(data, self.max_image_pixels, name=path)
            rng = np.random.default_rng(seed) if seed is not None else self._rng
            if self.resample is not None:
                return self._resampled_crops(to_rgb_array(img, path), rng, path)
            boxes, flip = self._boxes(*img.size, rng, path)
            crops = []
            for box in boxes:
                a = to_rgb_array(crop_image(img, box, path), path)
                crops.append(a[:, ::-1] if flip else a)
        except BadImage as e:
            raise DataError(f"{e}; did the file change since preparation? re-run `lorax data prepare`") from None
        except OSError as e:
            raise DataError(f"{path}: cannot decode ({e}); re-run `lorax data prepare` to quarantine it") from None
        return crops

    def _resampled_crops(self, full: np.ndarray, rng: np.random.Generator, path: Path) -> list[np.ndarray]:
        """The crops of the whole decoded image after :func:`resample_array` (the shortcut control)."""
        scale, filt = self.resample
        h, w = full.shape[:2]
        small = resample_array(full, scale, filt)
        if min(small.shape[:2]) < self.crop:
            raise DataError(
                f"{path}: image {w}x{h} resampled by eval.resample_control.scale={scale} is "
                f"{small.shape[1]}x{small.shape[0]}, smaller than crop {self.crop}; raise the scale or lower "
                "model.img_size"
            )
        boxes, flip = self._boxes(small.shape[1], small.shape[0], rng, path)
        crops = [small[t:b, l:r] for l, t, r, b in boxes]
        return [a[:, ::-1] for a in crops] if flip else crops

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        i, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple | list) else (int(key), None)
        crops = [to_tensor(a, self.mean, self.std) for a in self.load(i, seed)]
        x = torch.stack(crops) if not self.train and self.n_crops > 1 else crops[0]
        return x, int(self.class_ids[i]), i


class SeededSampler(Sampler):
    """Yields ``(row, crop_seed)``: a permutation (or order) and per-sample seeds from one torch generator."""

    def __init__(self, n: int, shuffle: bool, generator: torch.Generator) -> None:
        self.n, self.shuffle, self.generator = n, shuffle, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=self.generator)
        yield from zip(order.tolist(), seeds.tolist(), strict=True)


def make_loader(
    df: pd.DataFrame,
    train: bool,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    n_crops: int = 1,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    drop_last: bool = False,
    follow_links: bool = False,
) -> DataLoader:
    """A loader of ``(images, class_ids, rows)``; train shuffles and random-crops, eval keeps manifest order.

    The same ``seed`` gives the same batches and crops whatever ``num_workers`` is.
    """
    ds = ManifestDataset(df, train, crop, mean, std, n_crops=n_crops, max_image_pixels=max_image_pixels, seed=seed,
                         follow_links=follow_links)
    gen = torch.Generator().manual_seed(seed)
    sampler = SeededSampler(len(ds), shuffle=train, generator=gen)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        generator=gen,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        pin_memory=False,
    )
