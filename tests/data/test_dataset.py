"""ManifestDataset / make_loader: crop-not-resize, flips, normalisation, reproducibility (tiny folder in tmp_path)."""

from __future__ import annotations

import gc
import importlib.util
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lorax.config import DataConfig
from lorax.data.dataset import (
    ManifestDataset,
    crop_boxes,
    make_loader,
    multi_crops,
    normalization,
    to_tensor,
)
from lorax.data.images import DataError, load_rgb
from lorax.data.manifest import read_manifest
from lorax.data.prepare import prepare_task
from tests.helpers import noise_images, write_cddb

CROP = 16
HALF = (0.5, 0.5, 0.5)


@pytest.fixture
def manifest(tmp_path: Path) -> pd.DataFrame:
    """A prepared 1-task CDDB folder: 3 images per class and split, 24x30 px, one RGBA and one grey."""
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    write_cddb(root, ["t"], 3, noise_images(rng, (24, 30)))
    Image.fromarray(rng.integers(0, 256, (24, 30, 4), dtype=np.uint8), "RGBA").save(root / "t/train/0_real/a.png")
    Image.fromarray(rng.integers(0, 256, (24, 30), dtype=np.uint8), "L").save(root / "t/val/1_fake/g.png")
    res = prepare_task(root, "t", 2, tmp_path / "m", DataConfig(), CROP)
    return read_manifest(res.manifest)


def _raw(tensor: torch.Tensor) -> np.ndarray:
    """Undo the 0.5/0.5 normalisation back to uint8 HxWxC."""
    return np.rint((tensor.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).astype(np.uint8)


def test_eval_is_an_exact_center_crop(manifest: pd.DataFrame) -> None:
    ds = ManifestDataset(manifest, train=False, crop=CROP, mean=HALF, std=HALF)
    assert len(ds) == len(manifest) == 14
    for i in (0, len(ds) - 1):
        x, cid, row = ds[i]
        assert x.shape == (3, CROP, CROP) and x.dtype == torch.float32 and row == i
        assert cid == int(manifest["class_id"].iloc[i]) and cid in (4, 5)
        full = load_rgb(Path(manifest["root"].iloc[i]) / manifest["path"].iloc[i])
        top, left = (24 - CROP) // 2, (30 - CROP) // 2
        np.testing.assert_array_equal(_raw(x), full[top : top + CROP, left : left + CROP])  # cropped, not resized
    a, b = ds[3][0], ds[3][0]
    assert torch.equal(a, b)


def test_train_random_crops_are_windows_of_the_image_and_flip(manifest: pd.DataFrame) -> None:
    ds = ManifestDataset(manifest, train=True, crop=CROP, mean=HALF, std=HALF)
    full = load_rgb(Path(manifest["root"].iloc[0]) / manifest["path"].iloc[0])
    windows = {(t, l): full[t : t + CROP, l : l + CROP] for t in range(24 - CROP + 1) for l in range(30 - CROP + 1)}
    seen, flips = set(), 0
    for seed in range(40):
        crop = _raw(ds[(0, seed)][0])
        hit = [k for k, w in windows.items() if np.array_equal(w, crop)]
        hit_f = [k for k, w in windows.items() if np.array_equal(w[:, ::-1], crop)]
        assert hit or hit_f, "every train crop is an unscaled window (maybe mirrored)"
        seen.add((hit or hit_f)[0])
        flips += bool(hit_f) and not hit
        assert torch.equal(ds[(0, seed)][0], ds[(0, seed)][0])  # a seed fixes the crop
    assert len(seen) > 10 and 5 < flips < 35


def test_normalisations() -> None:
    # the libraries' own constants, read from their source files (importing open_clip/timm takes seconds)
    oc = runpy.run_path(str(Path(importlib.util.find_spec("open_clip").origin).parent / "constants.py"))
    tc = runpy.run_path(str(Path(importlib.util.find_spec("timm").origin).parent / "data" / "constants.py"))
    assert normalization("half") == (HALF, HALF)
    assert normalization("imagenet") == (tc["IMAGENET_DEFAULT_MEAN"], tc["IMAGENET_DEFAULT_STD"])
    assert normalization("clip") == (oc["OPENAI_DATASET_MEAN"], oc["OPENAI_DATASET_STD"])
    assert normalization("auto", {"mean": (0.1, 0.2, 0.3), "std": (1, 1, 1)}) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="model.normalize"):
        normalization("auto")
    with pytest.raises(ValueError, match="allowed: auto, half, imagenet, clip"):
        normalization("zscore")
    x = to_tensor(np.full((2, 2, 3), 255, np.uint8), *normalization("imagenet"))
    want = (1 - torch.tensor(tc["IMAGENET_DEFAULT_MEAN"])) / torch.tensor(tc["IMAGENET_DEFAULT_STD"])
    torch.testing.assert_close(x[:, 0, 0], want)
    torch.testing.assert_close(x[:, 1, 1], want)


def test_crop_grid_and_multi_crops() -> None:
    assert crop_boxes(30, 24, 16, 1) == [(7, 4, 23, 20)]
    assert crop_boxes(30, 24, 16, 4) == [(0, 0, 16, 16), (14, 0, 30, 16), (0, 8, 16, 24), (14, 8, 30, 24)]
    five = crop_boxes(30, 24, 16, 5)
    assert len(five) == 5 and (7, 4, 23, 20) in five  # corners + centre
    img = np.arange(24 * 30 * 3, dtype=np.int64).reshape(24, 30, 3)
    crops = multi_crops(img, 16, 4)
    assert crops.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(crops[3], img[8:24, 14:30])
    t = torch.from_numpy(img).permute(2, 0, 1)
    assert torch.equal(multi_crops(t, 16, 4)[3], t[:, 8:24, 14:30])
    with pytest.raises(DataError, match="smaller than crop 32"):
        crop_boxes(30, 24, 32)


def test_eval_multi_crops_stack(manifest: pd.DataFrame) -> None:
    ds = ManifestDataset(manifest, train=False, crop=CROP, mean=HALF, std=HALF, n_crops=4)
    x, _, _ = ds[0]
    assert x.shape == (4, 3, CROP, CROP)
    full = load_rgb(Path(manifest["root"].iloc[0]) / manifest["path"].iloc[0])
    np.testing.assert_array_equal(_raw(x[3]), full[8:24, 14:30])


def test_loader_reproduces_and_reshuffles(manifest: pd.DataFrame) -> None:
    def epochs(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        dl = make_loader(manifest, True, CROP, HALF, HALF, batch_size=4, num_workers=0, seed=seed)
        return [b for _ in range(2) for b in dl]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert len(a) == 8 and a[0][0].shape == (4, 3, CROP, CROP) and a[0][1].dtype == torch.int64
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True))
    rows0 = torch.cat([x[2] for x in a[:4]])
    rows1 = torch.cat([x[2] for x in a[4:]])
    assert sorted(rows0.tolist()) == list(range(14)) and not torch.equal(rows0, rows1)  # each epoch reshuffles
    assert not all(torch.equal(x[2], y[2]) for x, y in zip(a, c, strict=True))
    assert torch.equal(torch.cat([x[1] for x in a[:4]]), torch.tensor(manifest["class_id"].to_list())[rows0])
    ev = list(make_loader(manifest, False, CROP, HALF, HALF, batch_size=5, seed=0))
    assert torch.cat([x[2] for x in ev]).tolist() == list(range(14))  # eval keeps manifest order


def test_loader_with_workers_matches_in_process(manifest: pd.DataFrame) -> None:
    one = list(make_loader(manifest, True, CROP, HALF, HALF, batch_size=7, num_workers=0, seed=3))
    loader = make_loader(manifest, True, CROP, HALF, HALF, batch_size=7, num_workers=2, seed=3)
    two = list(loader)
    del loader  # persistent workers: shut them down here, not when a later test's garbage collection finds them
    gc.collect()
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(one, two, strict=True))


def test_image_smaller_than_crop_or_changed_file(manifest: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"smaller than crop 32.*re-run `lorax data prepare`"):
        ManifestDataset(manifest, train=False, crop=32)[0]
    Path(manifest["root"].iloc[1], manifest["path"].iloc[1]).write_bytes(b"")
    # the file no longer has the manifest's hash (checked before decoding)
    with pytest.raises(DataError, match=r"changed since the manifest was written.*re-run `lorax data prepare`"):
        ManifestDataset(manifest, train=False, crop=CROP)[1]


def test_resample_control_resizes_the_decoded_image_before_cropping(manifest: pd.DataFrame) -> None:
    """eval.resample_control: 24x30 -> 22x28 (x 0.9375, Lanczos), then the same crops; the crop size is kept."""
    from lorax.data.dataset import resample_array

    plain = ManifestDataset(manifest, train=False, crop=CROP, mean=HALF, std=HALF, n_crops=4)
    res = ManifestDataset(manifest, train=False, crop=CROP, mean=HALF, std=HALF, n_crops=4,
                          resample=(0.9375, "lanczos"))
    i = 0
    full = load_rgb(plain.paths[i])
    small = resample_array(full, 0.9375, "lanczos")
    assert small.shape == (22, 28, 3)  # round(24 * 0.9375), round(30 * 0.9375)
    x, x0 = res[i][0], plain[i][0]
    assert x.shape == x0.shape == (4, 3, CROP, CROP)
    want = multi_crops(small, CROP, 4)
    for k in range(4):
        assert np.array_equal(_raw(x[k]), want[k])
    assert not np.array_equal(_raw(x[0]), _raw(x0[0]))  # the resampled corner differs from the original's
    # train mode (random crop, flip) works on the resampled image too
    tr = ManifestDataset(manifest, train=True, crop=CROP, mean=HALF, std=HALF, resample=(0.9375, "lanczos"))
    assert tr[(i, 7)][0].shape == (3, CROP, CROP)


def test_resample_control_below_the_crop_names_the_setting(manifest: pd.DataFrame) -> None:
    ds = ManifestDataset(manifest, train=False, crop=CROP, mean=HALF, std=HALF, resample=(0.5, "bicubic"))
    with pytest.raises(DataError, match=r"resample_control\.scale=0\.5 is 15x12, smaller than crop 16"):
        ds[0]
