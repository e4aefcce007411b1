"""The detector's frozen-trunk path: same logits as the full forward, the trunk's outputs of every view kept in the
feature store (read again, never recomputed; one image added computes only its views; another backbone is another
producer), training on fixed views, the run_detect branch (``detect.views >= 1``), and the real-image profile on the
shared t2i set (skipped without it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lorax.config import load_params
from lorax.data.dataset import ManifestDataset, to_tensor
from lorax.data.manifest import read_manifest
from lorax.detect.augment import jpeg, rescale
from lorax.detect.config import DetectConfig
from lorax.detect.detector import build_detector, load_detector
from lorax.detect.fixed_views import fit_detector, score_frame
from lorax.detect.runner import detect_params, run_detect
from lorax.detect.trunk import RobustAug, encode_trunk, head_logits, perturbation, perturbations, trunk_start
from lorax.detect.trunk_features import TrunkFeatures, aug_of, train_plan, trunk_producer
from lorax.features.store import FeatureStore
from tests.conftest import tiny_params
from tests.detect.synth import make_zoo

REPO = Path(__file__).resolve().parents[2]
T2I = REPO.parent / "shared" / "data" / "t2i"
FIXED = {"detect__train_tasks": ["checker_a"], "detect__blocks": 1, "detect__epochs": 3, "detect__lr": 3e-3,
         "detect__batch_size": 16, "detect__blur_sigmas": [1], "detect__jpeg_qualities": [50],
         "detect__scale_factors": [0.5], "detect__views": 2, "detect__aug_prob": 0.3, "detect__aug_scale_prob": 0.2}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("trunk_zoo"), n_train=24, n_val=10)


def _params(**extra):
    return detect_params(tiny_params(None, **{**FIXED, **extra}))


def _split(zoo: Path, task: str, split: str):
    df = read_manifest(zoo / f"{task}.parquet")
    return df[df["split"] == split].reset_index(drop=True)


def _shards(root: Path) -> set[Path]:
    return set(root.rglob("*.safetensors"))


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
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


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
    np.testing.assert_array_equal(perturbation("jpeg75")(img), jpeg(img, 75))  # the name is the whole operation
    np.testing.assert_array_equal(perturbation("scale0.5")(img), out)
    for bad in ("jpegx", "sharpen2"):
        with pytest.raises(ValueError, match="unknown perturbation"):
            perturbation(bad)


def test_views_are_seeded_and_augmented() -> None:
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    img = np.full((16, 16, 3), 128, np.uint8)
    img[::2] = 30
    aug = RobustAug(blur_prob=1.0, jpeg_prob=0.0, scale_prob=0.0, sigma_range=(1.0, 1.0))
    a, b = aug(img, rng_a), aug(img, rng_b)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, img)
    ops = aug.draw(np.random.default_rng(1))  # what was drawn is what was applied
    assert ops == [["blur", 1.0]]
    np.testing.assert_array_equal(RobustAug.apply(img, ops), a)


def test_no_cache_setting_is_left_under_detect() -> None:
    assert not [k for k in DetectConfig.model_fields if "cache" in k]
    for name in ("params.yaml", "params.realworld.yaml"):
        assert not [k for k in yaml.safe_load((REPO / name).read_text())["detect"] if "cache" in k], name


def test_stored_views_are_read_again_and_training_on_them_learns(zoo: Path, tmp_path: Path) -> None:
    params = _params()
    train_df = _split(zoo, "checker_a", "train")
    trunk = TrunkFeatures(FeatureStore(tmp_path / "features"), params.model, params.detect)
    views = trunk.train(train_df, seed=0)
    assert len(views) == 2 * len(train_df) and trunk.computed == len(views)
    assert views.tokens.dtype == torch.float32 and list(views.rows[:4]) == [0, 0, 1, 1]
    shards = _shards(tmp_path / "features")
    assert shards and (tmp_path / "features" / trunk.key / "producer.json").is_file()

    again = TrunkFeatures(FeatureStore(tmp_path / "features"), params.model, params.detect)  # a new run
    read = again.train(train_df, seed=0)
    assert again.computed == 0 and _shards(tmp_path / "features") == shards  # nothing recomputed, nothing added
    assert torch.equal(read.tokens, views.tokens) and torch.equal(read.pre, views.pre)  # bit for bit
    np.testing.assert_array_equal(read.labels, views.labels)

    other = again.train(train_df, seed=1)  # another seed: other views, other entries
    assert again.computed > 0 and not torch.equal(other.tokens, views.tokens)

    det, history = fit_detector(params.model, params.detect, "mole", views, trunk.start, seed=0)
    assert len(history) == 3 and history[-1]["bce"] < history[0]["bce"]
    val = _split(zoo, "checker_b", "val")
    s = score_frame(det, trunk.eval(val), trunk.start, len(val))
    y = (val["class_id"].to_numpy() % 2).astype(int)
    assert s.shape == (len(val),) and s[y == 1].mean() > s[y == 0].mean()


def test_adding_an_image_computes_only_its_views(zoo: Path) -> None:
    params = _params()
    df = _split(zoo, "checker_a", "train")
    trunk = TrunkFeatures(FeatureStore(None), params.model, params.detect)
    first = trunk.train(df.iloc[:-1].reset_index(drop=True), seed=0)
    trunk.computed = 0
    both = trunk.train(df, seed=0)
    assert trunk.computed == params.detect.views  # the new image's views only
    assert torch.equal(both.tokens[:len(first)], first.tokens)  # the others' views did not change
    ds = ManifestDataset(df, train=True, crop=params.model.img_size)
    shuffled = df.iloc[::-1].reset_index(drop=True)  # an image's views do not depend on its frame or position
    a = train_plan(df, ds, 2, aug_of(params.detect), 0).ids
    b = train_plan(shuffled, ManifestDataset(shuffled, train=True, crop=params.model.img_size), 2,
                   aug_of(params.detect), 0).ids
    np.testing.assert_array_equal(a.reshape(len(df), 2, 32), b.reshape(len(df), 2, 32)[::-1])
    trunk.eval(df.iloc[:-1].reset_index(drop=True), n_crops=4)
    trunk.computed = 0
    trunk.eval(df, n_crops=4)
    assert trunk.computed == 4  # the new image's evaluation crops only
    trunk.computed = 0
    trunk.eval(df, perturb="jpeg50", n_crops=4)  # a perturbation is other views
    assert trunk.computed == 4 * len(df)


def test_another_backbone_weights_or_trunk_end_is_another_producer(zoo: Path) -> None:
    params = _params()
    df = _split(zoo, "checker_a", "val")
    store = FeatureStore(None)
    base = TrunkFeatures(store, params.model, params.detect)
    base.eval(df)
    changed = [_params(model__init_seed=1), _params(model__kwargs={**params.model.kwargs, "num_heads": 4}),
               _params(detect__blocks=2)]
    keys = {base.key}
    for p in changed:
        t = TrunkFeatures(store, p.model, p.detect)
        t.eval(df)
        assert t.computed == len(df), p.model  # all new entries
        keys.add(t.key)
    assert len(keys) == 1 + len(changed)
    assert TrunkFeatures(store, params.model, params.detect.model_copy(update={"epochs": 9})).key == base.key

    det, start, cpu = base.encoder, base.start, torch.device("cpu")  # same settings, other weights
    with torch.no_grad():
        det.backbone.blocks[start].mlp.fc1.weight.add_(1.0)  # above the trunk: the same producer
        assert trunk_producer(det, params.model, start, cpu)[0] == base.key
        det.backbone.blocks[0].mlp.fc1.weight.add_(1.0)  # below: another
        assert trunk_producer(det, params.model, start, cpu)[0] != base.key


def test_logits_from_stored_outputs_equal_the_forward_on_the_same_crops(zoo: Path, tmp_path: Path) -> None:
    params = _params()
    df = _split(zoo, "checker_b", "val").iloc[:6].reset_index(drop=True)
    det = build_detector(params.model, params.detect, "mole", seed=0).eval()
    with torch.no_grad():
        for p in det.trainable_parameters():
            p.normal_(0, 0.05)
    TrunkFeatures(FeatureStore(tmp_path / "f"), params.model, params.detect).eval(df, "blur1", n_crops=4)
    trunk = TrunkFeatures(FeatureStore(tmp_path / "f"), params.model, params.detect)
    cs = trunk.eval(df, "blur1", n_crops=4)
    assert trunk.computed == 0
    info = det.backbone.info
    ds = ManifestDataset(df, train=False, crop=params.model.img_size, n_crops=4)
    fn = perturbation("blur1")
    x = torch.stack([to_tensor(fn(np.ascontiguousarray(a)), info.mean, info.std) for r in range(len(df))
                     for a in ds.load(r)])
    with torch.no_grad():
        torch.testing.assert_close(head_logits(det, cs.tokens, cs.pre, trunk.start), det(x), atol=1e-5, rtol=1e-5)

    views = trunk.train(df, seed=3)  # training views: the pixels their ids name (box, flip, augmentation)
    tds = ManifestDataset(df, train=True, crop=params.model.img_size)
    plan = train_plan(df, tds, 2, aug_of(params.detect), 3)
    assert any(plan.ops) and any(not o for o in plan.ops)
    x = torch.stack([to_tensor(np.ascontiguousarray(RobustAug.apply(np.ascontiguousarray(
        tds.load(int(r), seed=int(s))[0]), o)), info.mean, info.std) for r, s, o in zip(plan.rows, plan.seeds,
                                                                                         plan.ops, strict=True)])
    with torch.no_grad():
        torch.testing.assert_close(head_logits(det, views.tokens, views.pre, trunk.start), det(x), atol=1e-5,
                                   rtol=1e-5)


def test_run_detect_on_fixed_views(zoo: Path, tmp_path: Path) -> None:
    params = tiny_params(None, **FIXED, cache__dir=str(tmp_path / "cache"))
    metrics = run_detect(params, zoo, tmp_path / "out", method="mole")
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(metrics["robustness"]) == {"blur", "jpeg", "scale"}
    assert set(metrics["per_generator"]) == {"checker_b", "stripes"}
    assert metrics["per_generator"]["checker_b"]["ap"] > 60 and metrics["seen"]["checker_a"]["ap"] > 60
    det, thr, info = load_detector(tmp_path / "out" / "detector.safetensors")
    assert thr == metrics["threshold"] and not torch.equal(det.feat_std, torch.ones_like(det.feat_std))

    shards = _shards(tmp_path / "cache" / "features")
    assert shards
    again = run_detect(params, zoo, tmp_path / "again", method="mole")  # a re-run reads every view
    assert _shards(tmp_path / "cache" / "features") == shards
    off = tiny_params(None, **FIXED, cache__enabled=False)  # in memory: the same results
    memory = run_detect(off, zoo, tmp_path / "memory", method="mole")
    for k in ("threshold", "map", "per_generator", "seen", "robustness"):
        assert again[k] == metrics[k] == memory[k], k


@pytest.mark.skipif(not T2I.is_dir(), reason="../shared/data/t2i is not present")
def test_realworld_profile_reads_the_t2i_images() -> None:
    """The real-image profile: 224 px native crops of the t2i JPEGs, fixed augmented views."""
    params = load_params(REPO / "params.realworld.yaml", {"detect.train_tasks": ["sd15"]})
    cfg = detect_params(params).detect
    assert cfg.views >= 1 and cfg.scale_factors and cfg.aug_prob > 0
    assert detect_params(params).model.img_size == 224
    img = sorted((T2I / "sd15" / "val" / "1_fake").glob("*.jpg"))[0]
    from PIL import Image

    with Image.open(img) as im:
        assert min(im.size) >= 224  # crops at native resolution, never resized
