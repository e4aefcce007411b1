"""Decode cache: same crops as decoding the files, shards shared and keyed by content, size limit, workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lorax.config import DataConfig
from lorax.data.cache import CachedManifestDataset, decoded_bytes, open_decode_cache, shard_key
from lorax.data.dataset import ManifestDataset
from lorax.data.images import DataError
from lorax.data.manifest import read_manifest
from lorax.data.prepare import prepare_task
from tests.helpers import noise_images, write_cddb

CROP = 16


@pytest.fixture
def manifest(tmp_path: Path) -> pd.DataFrame:
    """A prepared task: RGB, RGBA (composited on white), grey and palette images of two sizes."""
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    write_cddb(root, ["t"], 3, noise_images(rng, lambda k: (24, 30) if k < 2 else (20, 17)))
    Image.fromarray(rng.integers(0, 256, (24, 30, 4), dtype=np.uint8), "RGBA").save(root / "t/train/0_real/a.png")
    Image.fromarray(rng.integers(0, 256, (24, 30), dtype=np.uint8), "L").save(root / "t/train/1_fake/g.png")
    Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).convert("P").save(root / "t/val/1_fake/p.png")
    res = prepare_task(root, "t", 0, tmp_path / "m", DataConfig(), CROP)
    return read_manifest(res.manifest)


@pytest.mark.parametrize("train, n_crops", [(True, 1), (False, 1), (False, 4)])
def test_cached_crops_equal_decoded_crops(manifest: pd.DataFrame, tmp_path: Path, train: bool, n_crops: int):
    cache = open_decode_cache(manifest, tmp_path / "cache", max_mb=16)
    assert cache is not None and len(cache) == len(manifest)
    ref = ManifestDataset(manifest, train=train, crop=CROP, n_crops=n_crops)
    got = CachedManifestDataset(manifest, cache, train=train, crop=CROP, n_crops=n_crops)
    for i in range(len(manifest)):
        for seed in (1, 2, 3):
            a, b = ref[(i, seed)], got[(i, seed)]
            assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    w, h = manifest["width"].to_numpy(), manifest["height"].to_numpy()
    assert {(int(x), int(y)) for x, y in zip(w, h, strict=True)} == {(30, 24), (17, 20)}  # sizes really vary


def test_shards_are_per_task_split_and_reused(manifest: pd.DataFrame, tmp_path: Path):
    d = tmp_path / "cache"
    train = manifest[manifest["split"] == "train"].reset_index(drop=True)
    open_decode_cache(manifest, d, max_mb=16)
    shards = sorted(p.name for p in d.iterdir())
    assert len(shards) == 2  # train, val
    meta = {p.name: (p / "meta.json").stat().st_mtime_ns for p in d.iterdir()}
    again = open_decode_cache(train, d, max_mb=16)  # the train shard is reused, nothing new
    assert again is not None and sorted(p.name for p in d.iterdir()) == shards
    assert {p.name: (p / "meta.json").stat().st_mtime_ns for p in d.iterdir()} == meta  # nor rewritten
    # a subset (replayed exemplars) is a shard of its own; the full split's shard is untouched
    open_decode_cache(train.iloc[:3], d, max_mb=16)
    assert len(list(d.iterdir())) == 3
    assert not list(d.glob("*.partial-*"))


def test_changed_file_changes_the_key(manifest: pd.DataFrame):
    k = shard_key(manifest)
    edited = manifest.copy()
    edited.loc[0, "sha256"] = "0" * 64
    assert shard_key(edited) != k
    assert shard_key(manifest.copy()) == k


def test_size_limit_and_bad_file(manifest: pd.DataFrame, tmp_path: Path):
    need = decoded_bytes(manifest)
    assert need == int((manifest["width"] * manifest["height"] * 3).sum())
    assert open_decode_cache(manifest, tmp_path / "c1", max_mb=(need - 1) / 2**20) is None
    assert not (tmp_path / "c1").exists()
    path = Path(manifest["root"].iloc[0]) / manifest["path"].iloc[0]
    path.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"{path.name}.*lorax data prepare"):
        open_decode_cache(manifest, tmp_path / "c2", max_mb=16)
    assert not list((tmp_path / "c2").glob("*/pixels.u8"))  # no half shard left behind


def test_workers_map_the_shard_themselves(manifest: pd.DataFrame, tmp_path: Path):
    import pickle

    cache = open_decode_cache(manifest, tmp_path / "cache", max_mb=16)
    ds = CachedManifestDataset(manifest, cache, train=False, crop=CROP)
    ds[0]  # maps the shard in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the pixels do not travel with the dataset
    assert torch.equal(pickle.loads(blob)[5][0], ds[5][0])


def test_trainer_loader_reads_the_cache(manifest: pd.DataFrame, tmp_path: Path):
    """cache.decode on: the trainer's loader gives the same batches, and the pixels come from the shards."""
    from lorax.continual.methods import build_method
    from lorax.continual.batches import loader_for
    from tests.helpers import tiny_params

    five = {"train__batch_size": 5, "eval__batch_size": 5}
    off = tiny_params(tmp_path, **five)
    on = tiny_params(tmp_path, cache__decode=True, cache__dir=str(tmp_path / "c"), **five)
    method = build_method(off, ["deconv"])
    for train in (True, False):
        a = list(loader_for(manifest, method, off, train=train, seed=4))
        b = list(loader_for(manifest, method, on, train=train, seed=4))
        assert len(a) == len(b) == 3
        for (xa, ya, ra), (xb, yb, rb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ra, rb)
    assert len(list((tmp_path / "c" / "decoded").glob("*/pixels.u8"))) == 2  # train and val shards
    ds = loader_for(manifest, method, on, train=False, seed=0).dataset
    assert ds.__class__.__name__ == "CachedManifestDataset"
    tiny = tiny_params(tmp_path, cache__decode=True, cache__dir=str(tmp_path / "c2"), cache__decode_max_mb=0.001)
    assert loader_for(manifest, method, tiny, train=False, seed=0).dataset.__class__.__name__ == "ManifestDataset"
