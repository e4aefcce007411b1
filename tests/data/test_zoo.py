"""The built-in generator zoo: layout, determinism, errors, and that it is a real (learnable, shortcut-free) problem."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from lorax.data import zoo
from lorax.data.zoo_generators import GENERATORS, build_decoder, to_tensor
from lorax.data.zoo_real import PHOTOS, domain_for, load_photo, rng_for, sample_real
from tests.helpers import tiny_params

ZOO10 = [
    "deconv", "nnconv", "bilinconv", "pixshuf", "deconv3", "bicubconv", "nnconv4", "pixshuf4", "deconv2x", "dilconv",
]


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- names, scenarios, errors

def test_generators_match_params_order() -> None:
    cfg = tiny_params().zoo
    assert cfg.order == ZOO10
    assert set(GENERATORS) == set(ZOO10)


def test_scenario_generators() -> None:
    cfg = tiny_params().zoo
    assert zoo.scenario_generators("zoo-5", cfg) == ZOO10[:5]
    assert zoo.scenario_generators("zoo-8", cfg) == ZOO10[:8]
    assert zoo.scenario_generators("zoo-10", cfg) == ZOO10
    for bad in ["zoo-0", "zoo-11", "zoo", "easy", "zoo-5x"]:
        with pytest.raises(ValueError, match="allowed values: zoo-1 .. zoo-10"):
            zoo.scenario_generators(bad, cfg)


def test_unknown_generator_lists_known(tmp_path: Path) -> None:
    cfg = tiny_params().zoo
    with pytest.raises(ValueError, match="known generators: deconv, nnconv"):
        zoo.synth_tasks(["deconv", "stylegan"], tmp_path, cfg)
    assert not (tmp_path / "deconv").exists()  # checked before anything is written


def test_bundled_photos_load_offline() -> None:
    for name in PHOTOS:
        img = load_photo(name)
        assert img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 100, name
        assert 0.0 <= img.min() and img.max() <= 1.0


def test_domains_are_per_task_and_deterministic() -> None:
    domains = [domain_for(0, g) for g in ZOO10]
    assert domains == [domain_for(0, g) for g in ZOO10]
    assert len(set(domains)) == len(ZOO10)
    assert domain_for(1, "deconv") != domain_for(0, "deconv")


# ---------------------------------------------------------------- layout, counts, determinism

def test_layout_counts_and_determinism(tmp_path: Path) -> None:
    cfg = tiny_params().zoo  # 24 px, 12 train / 6 val per class
    tasks = ["deconv", "nnconv4"]
    counts = zoo.synth_tasks(tasks, tmp_path / "a", cfg)
    want = {"train": {"0_real": 12, "1_fake": 12}, "val": {"0_real": 6, "1_fake": 6}}
    assert counts == {t: want for t in tasks}
    for t in tasks:
        for split, per in want.items():
            for label, n in per.items():
                files = sorted((tmp_path / "a" / t / split / label).iterdir())
                kind = label.split("_")[1]
                assert [f.name for f in files] == [f"{t}_{split}_{kind}_{i:05d}.png" for i in range(n)]
                with Image.open(files[0]) as im:
                    assert im.size == (24, 24) and im.mode == "RGB"
        meta = json.loads((tmp_path / "a" / t / "zoo.json").read_text())
        assert meta["counts"] == want and meta["seed"] == cfg.seed and meta["generator"]["name"] == t
        assert meta["generator"]["description"] == GENERATORS[t].description
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(tasks)  # no temporary folders left

    # a re-run elsewhere gives the same bytes; other seeds give other bytes
    zoo.synth_tasks(tasks, tmp_path / "b", cfg)
    assert _tree_hashes(tmp_path / "a") == _tree_hashes(tmp_path / "b")
    zoo.synth_tasks(tasks[:1], tmp_path / "c", cfg.model_copy(update={"seed": 1}))
    a, c = _tree_hashes(tmp_path / "a" / "deconv"), _tree_hashes(tmp_path / "c" / "deconv")
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_rerun_skips_complete_task_and_rewrites_changed_one(tmp_path: Path) -> None:
    cfg = tiny_params().zoo.model_copy(update={"train_per_class": 4, "val_per_class": 2})
    zoo.synth_task("pixshuf", tmp_path, cfg)
    png = tmp_path / "pixshuf" / "train" / "1_fake" / "pixshuf_train_fake_00000.png"
    stamp = png.stat().st_mtime_ns
    zoo.synth_task("pixshuf", tmp_path, cfg)
    assert png.stat().st_mtime_ns == stamp  # complete and matching: skipped

    # a stale temporary folder from a killed run is not a task and gets cleaned up
    stale = tmp_path / ".pixshuf.tmp-999999999"
    (stale / "train").mkdir(parents=True)
    bigger = cfg.model_copy(update={"train_per_class": 6})
    assert zoo.synth_task("pixshuf", tmp_path, bigger)["train"]["1_fake"] == 6
    assert len(list((tmp_path / "pixshuf" / "train" / "1_fake").iterdir())) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pixshuf"]
    # the val stream does not depend on the train count
    again = tmp_path / "again"
    zoo.synth_task("pixshuf", again, cfg)
    assert _tree_hashes(tmp_path / "pixshuf" / "val") == _tree_hashes(again / "pixshuf" / "val")


def test_incomplete_task_is_rebuilt(tmp_path: Path) -> None:
    cfg = tiny_params().zoo.model_copy(update={"train_per_class": 3, "val_per_class": 2})
    zoo.synth_task("deconv", tmp_path, cfg)
    ref = _tree_hashes(tmp_path / "deconv")
    (tmp_path / "deconv" / "val" / "0_real" / "deconv_val_real_00001.png").unlink()
    zoo.synth_task("deconv", tmp_path, cfg)
    assert _tree_hashes(tmp_path / "deconv") == ref


def test_artifact_setting_changes_only_the_fakes() -> None:
    cfg = tiny_params().zoo.model_copy(update={"train_per_class": 3, "val_per_class": 1})
    a = zoo.render_task("nnconv", cfg.model_copy(update={"artifact": 0.0}))["train"]
    b = zoo.render_task("nnconv", cfg.model_copy(update={"artifact": 0.6}))["train"]
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])
    # a stronger artifact moves the fakes further from the artifact-free rendering, not their colours
    c = zoo.render_task("nnconv", cfg.model_copy(update={"artifact": 1.2}))["train"]
    d1, d2 = (np.abs(x[1].astype(float) - a[1]).mean() for x in (b, c))
    assert 0 < d1 < d2
    assert np.abs(c[1].astype(float).mean((1, 2)) - a[1].mean((1, 2))).max() < 8  # of 255


@pytest.mark.parametrize("size", [16, 30])
def test_odd_sizes(size: int) -> None:
    cfg = tiny_params().zoo.model_copy(update={"image_size": size, "train_per_class": 2, "val_per_class": 1})
    for g in ["pixshuf4", "deconv3"]:
        real, fake = zoo.render_task(g, cfg)["train"]
        assert real.shape == fake.shape == (2, size, size, 3) and fake.dtype == np.uint8


# ---------------------------------------------------------------- fingerprints

def _logreg(x: np.ndarray, y: np.ndarray, c: float):
    """Standardised logistic regression; one BLAS thread (many threads on a busy 2-core box: 30x slower)."""
    with threadpool_limits(1):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)


def _log_spectrum(x: np.ndarray) -> np.ndarray:
    grey = x.astype(np.float64).mean(axis=-1)
    grey = grey - grey.mean(axis=(1, 2), keepdims=True)
    return np.log(np.abs(np.fft.rfft2(grey)) + 1e-3)


def test_fakes_keep_source_colours() -> None:
    domain = domain_for(0, "deconv")
    dec = build_decoder("deconv", 0, domain, 32, artifact=tiny_params().zoo.artifact)
    rng = rng_for(0, "test-colours")
    src = to_tensor(np.stack([sample_real(rng, domain, 32) for _ in range(16)]))
    with torch.no_grad():
        fake = dec(src)
    assert fake.shape == src.shape
    # per-channel mean and std follow the source (up to clipping to [0, 1])
    assert (fake.mean((2, 3)) - src.mean((2, 3))).abs().max() < 0.03
    std_err = (fake.std((2, 3)) - src.std((2, 3))).abs()
    assert std_err.mean() < 0.01 and std_err.max() < 0.05
    # ... and re-synthesise the content: fakes correlate with their sources
    corr = np.corrcoef(fake.flatten().numpy(), src.flatten().numpy())[0, 1]
    assert corr > 0.8


def test_every_generator_leaves_its_own_fingerprint() -> None:
    """The same source images through every decoder: the content is identical, so only the generators'
    fingerprints can tell their outputs apart, and a spectral classifier tells all ten apart."""
    size, n = 32, 24
    domain = domain_for(0, "deconv")
    rng = rng_for(0, "test-fingerprint")
    src = to_tensor(np.stack([sample_real(rng, domain, size) for _ in range(n)]))
    feats = []
    for g in ZOO10:
        with torch.no_grad():
            fake = build_decoder(g, 0, domain, size, artifact=0.0)(src).permute(0, 2, 3, 1).numpy()
        feats.append(_log_spectrum(fake).reshape(n, -1))
    x, y = np.concatenate(feats), np.repeat(np.arange(len(ZOO10)), n)
    train = np.tile(np.arange(n) < n // 2, len(ZOO10))  # first half of the sources to train, second to test
    pred = _logreg(x[train], y[train], c=0.01).predict(x[~train])
    recall = [(pred[y[~train] == k] == k).mean() for k in range(len(ZOO10))]
    assert min(recall) >= 0.5 and np.mean(recall) >= 0.8, dict(zip(ZOO10, recall))


# ---------------------------------------------------------------- a real problem: learnable, no shortcut

@pytest.fixture(scope="module")
def zoo5() -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    cfg = tiny_params().zoo.model_copy(update={"image_size": 48, "train_per_class": 40, "val_per_class": 20})
    return {g: zoo.render_task(g, cfg) for g in zoo.scenario_generators("zoo-5", cfg)}


def _spectral(x: np.ndarray, rng: np.random.Generator, crop: int = 32) -> np.ndarray:
    """Mean-removed log-FFT magnitude of the grey image of a random 32x32 crop (as the learner sees)."""
    ij = rng.integers(0, x.shape[1] - crop + 1, (len(x), 2))
    crops = np.stack([im[i : i + crop, j : j + crop] for im, (i, j) in zip(x, ij)])
    return _log_spectrum(crops).reshape(len(x), -1)


def _thumbnail(x: np.ndarray, k: int = 8) -> np.ndarray:
    s = x.shape[1]
    return (x.astype(np.float64) / 255).reshape(len(x), k, s // k, k, s // k, 3).mean(axis=(2, 4)).reshape(len(x), -1)


def _accuracy(data: dict, feat, target: str, c: float) -> float:
    """Train on train, score on val. target: 'generator' (fakes only), 'real-fake' or 'all' (2T classes)."""
    def xy(split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i, g in enumerate(data):
            real, fake = data[g][split]
            if target != "generator":
                xs.append(feat(real))
                ys += [2 * i if target == "all" else 0] * len(real)
            xs.append(feat(fake))
            ys += [{"all": 2 * i + 1, "real-fake": 1, "generator": i}[target]] * len(fake)
        return np.concatenate(xs), np.array(ys)

    return float(_logreg(*xy("train"), c=c).score(*xy("val")))


def test_spectral_features_attribute_far_above_chance(zoo5: dict) -> None:
    rng = np.random.default_rng(0)
    feat = lambda x: _spectral(x, rng)  # noqa: E731
    gen = _accuracy(zoo5, feat, "generator", c=0.01)
    per_task = [_accuracy({g: d}, feat, "real-fake", c=0.01) for g, d in zoo5.items()]
    assert gen >= 0.8, gen  # chance 0.2
    assert np.mean(per_task) >= 0.85 and min(per_task) >= 0.7, per_task  # chance 0.5


def test_colour_thumbnails_stay_near_chance(zoo5: dict) -> None:
    gen = _accuracy(zoo5, _thumbnail, "generator", c=1.0)
    rf = _accuracy(zoo5, _thumbnail, "real-fake", c=1.0)
    assert gen <= 0.35, gen  # chance 0.2
    assert rf <= 0.62, rf  # chance 0.5
