"""The detector's frozen-trunk path: same logits as the full forward, a disk cache that is reused, training on
cached views, the run_detect branch, and the real-image profile on the shared t2i set (skipped without it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorax.config import load_params
from lorax.data.manifest import read_manifest
from lorax.detect.augment import rescale
from lorax.detect.cached import TrunkStore, fit_detector, score_frame
from lorax.detect.detector import build_detector, load_detector
from lorax.detect.runner import detect_params, run_detect
from lorax.detect.trunk import RobustAug, encode_trunk, head_logits, perturbations, trunk_start
from tests.conftest import tiny_params
from tests.detect.synth import make_zoo

REPO = Path(__file__).resolve().parents[2]
T2I = REPO.parent / "shared" / "data" / "t2i"
CACHED = {"detect__train_tasks": ["checker_a"], "detect__blocks": 1, "detect__epochs": 3, "detect__lr": 3e-3,
          "detect__batch_size": 16, "detect__blur_sigmas": [1], "detect__jpeg_qualities": [50],
          "detect__scale_factors": [0.5], "detect__trunk_cache": True, "detect__views": 2,
          "detect__aug_prob": 0.3, "detect__aug_scale_prob": 0.2}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("trunk_zoo"), n_train=24, n_val=10)


def test_trunk_then_head_equals_the_full_forward() -> None:
    params = detect_params(tiny_params(None, detect__blocks=1))
    det = build_detector(params.model, params.detect, "mole", seed=0).eval()
    with torch.no_grad():  # non-zero B so the adapters change the output
        for p in det.trainable_parameters():
            p.normal_(0, 0.05)
    start = trunk_start(det, 1)
    assert start == det.backbone.depth - 1
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens, pre = encode_trunk(det, x, start)
        got = head_logits(det, tokens, pre, start)
        want = det(x)
    assert tokens.dtype == torch.float16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_rescale_keeps_the_size_and_loses_detail() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert rescale(img, 1.0) is img
    out = rescale(img, 0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(np.diff(out.astype(float), axis=1)).mean() < np.abs(np.diff(img.astype(float), axis=1)).mean()
    with pytest.raises(ValueError, match="rescale factor"):
        rescale(img, 1.5)
    assert set(perturbations([75], [1], [0.5])) == {"jpeg75", "blur1", "scale0.5"}


def test_views_are_seeded_and_augmented() -> None:
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    img = np.full((16, 16, 3), 128, np.uint8)
    img[::2] = 30
    aug = RobustAug(blur_prob=1.0, jpeg_prob=0.0, scale_prob=0.0, sigma_range=(1.0, 1.0))
    a, b = aug(img, rng_a), aug(img, rng_b)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, img)


def test_store_reuses_its_disk_cache_and_cached_training_learns(zoo: Path, tmp_path: Path) -> None:
    params = detect_params(tiny_params(None, **CACHED))
    df = read_manifest(zoo / "checker_a.parquet")
    train_df = df[df["split"] == "train"].reset_index(drop=True)
    store = TrunkStore(tmp_path / "trunk", params.model, params.detect)
    views = store.train(train_df, seed=0)
    assert len(views) == 2 * len(train_df) and len(list((tmp_path / "trunk").glob("*.safetensors"))) == 1
    again = TrunkStore(tmp_path / "trunk", params.model, params.detect).train(train_df, seed=0)
    torch.testing.assert_close(again.tokens, views.tokens)
    other = store.train(train_df, seed=1)  # another seed: other views, another file
    assert not torch.equal(other.tokens, views.tokens)
    assert len(list((tmp_path / "trunk").glob("*.safetensors"))) == 2

    det, history = fit_detector(params.model, params.detect, "mole", views, store.start, seed=0)
    assert len(history) == 3 and history[-1]["bce"] < history[0]["bce"]
    val = read_manifest(zoo / "checker_b.parquet")
    val = val[val["split"] == "val"].reset_index(drop=True)
    s = score_frame(det, store.eval(val), store.start, len(val))
    y = (val["class_id"].to_numpy() % 2).astype(int)
    assert s.shape == (len(val),) and s[y == 1].mean() > s[y == 0].mean()


def test_run_detect_through_the_trunk_cache(zoo: Path, tmp_path: Path) -> None:
    params = tiny_params(None, **CACHED, detect__trunk_cache_dir=str(tmp_path / "trunk"))
    metrics = run_detect(params, zoo, tmp_path / "out", method="mole")
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(metrics["robustness"]) == {"blur", "jpeg", "scale"}
    assert set(metrics["per_generator"]) == {"checker_b", "stripes"}
    assert metrics["per_generator"]["checker_b"]["ap"] > 60 and metrics["seen"]["checker_a"]["ap"] > 60
    det, thr, info = load_detector(tmp_path / "out" / "detector.safetensors")
    assert thr == metrics["threshold"] and not torch.equal(det.feat_std, torch.ones_like(det.feat_std))


@pytest.mark.skipif(not T2I.is_dir(), reason="../shared/data/t2i is not present")
def test_realworld_profile_reads_the_t2i_images() -> None:
    """The real-image profile: 224 px native crops of the t2i JPEGs through the trunk cache settings."""
    params = load_params(REPO / "params.realworld.yaml", {"detect.train_tasks": ["sd15"]})
    cfg = detect_params(params).detect
    assert cfg.trunk_cache and cfg.scale_factors and cfg.aug_prob > 0
    assert detect_params(params).model.img_size == 224
    img = sorted((T2I / "sd15" / "val" / "1_fake").glob("*.jpg"))[0]
    from PIL import Image

    with Image.open(img) as im:
        assert min(im.size) >= 224  # crops at native resolution, never resized
