"""Blur/JPEG augmentation and perturbations, threshold fitting and per-generator metrics on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorax.detect.augment import BlurJpeg, augment_batch, gaussian_blur, jpeg, perturb_batch, to_pixels
from lorax.detect.evaluate import fit_threshold, generator_metrics, mean_of

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _textured(seed: int = 0, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _batch(n: int = 6, size: int = 16) -> torch.Tensor:
    px = np.stack([_textured(i, size) for i in range(n)])
    t = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255
    return (t - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_blur_changes_pixels_and_keeps_shape() -> None:
    img = _textured()
    out = gaussian_blur(img, 1.0)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.abs(out.astype(int) - img).mean() > 20  # noise is mostly smoothed away
    assert out.std() < img.std() / 2
    assert gaussian_blur(img, 0) is img
    flat = np.full((8, 8, 3), 77, np.uint8)
    assert np.array_equal(gaussian_blur(flat, 2.0), flat)  # reflected borders: a flat image stays flat
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(img, -1)


def test_jpeg_changes_pixels_more_at_low_quality() -> None:
    img = _textured()
    hi, lo = jpeg(img, 95), jpeg(img, 10)
    assert hi.shape == img.shape and hi.dtype == np.uint8
    err_hi, err_lo = np.abs(hi.astype(int) - img).mean(), np.abs(lo.astype(int) - img).mean()
    assert 0 < err_hi < err_lo
    with pytest.raises(ValueError, match="quality"):
        jpeg(img, 0)


def test_blur_jpeg_augmentation_is_deterministic_under_a_seed() -> None:
    imgs = [_textured(i) for i in range(12)]
    aug = BlurJpeg(prob=0.5)

    def run(seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [aug(im, rng) for im in imgs]

    a, b, c = run(3), run(3), run(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    changed = sum(not np.array_equal(x, im) for x, im in zip(a, imgs, strict=True))
    assert 0 < changed < len(imgs)  # p=0.5 for each of two operations
    rng = np.random.default_rng(0)
    assert all(BlurJpeg(prob=0.0)(im, rng) is im for im in imgs)
    assert all(not np.array_equal(BlurJpeg(prob=1.0, sigma_range=(1, 2))(im, rng), im) for im in imgs)


def test_batch_helpers_round_trip_exactly_and_touch_only_augmented_images() -> None:
    x = _batch()
    assert torch.allclose(perturb_batch(x, MEAN, STD, lambda im: im), x, atol=1e-5)
    assert np.array_equal(to_pixels(x, MEAN, STD)[0], _textured(0, 16))
    y = perturb_batch(x, MEAN, STD, lambda im: gaussian_blur(im, 2.0))
    assert (y - x).abs().mean() > 0.1
    aug = BlurJpeg(prob=0.5)
    a = augment_batch(x, MEAN, STD, aug, np.random.default_rng(1))
    b = augment_batch(x, MEAN, STD, aug, np.random.default_rng(1))
    assert torch.equal(a, b)
    same = [torch.equal(a[i], x[i]) for i in range(len(x))]
    assert any(same) and not all(same)
    assert augment_batch(x, MEAN, STD, BlurJpeg(prob=0.0), np.random.default_rng(1)) is x


def test_fit_threshold_maximises_accuracy() -> None:
    t = fit_threshold(np.array([0.1, 0.2, 0.6, 0.7]), np.array([0, 0, 1, 1]))
    assert t == pytest.approx(0.4)
    scores, labels = np.array([0.1, 0.3, 0.4, 0.8]), np.array([0, 1, 0, 1])
    t = fit_threshold(scores, labels)
    assert np.mean((scores >= t) == labels) == 0.75  # the best any threshold can do here
    assert fit_threshold(np.array([0.2, 0.3]), np.array([1, 1])) <= 0.2  # all fake: everything above
    assert fit_threshold(np.array([0.2, 0.3]), np.array([0, 0])) > 0.3  # all real: nothing above
    with pytest.raises(ValueError, match="no validation images"):
        fit_threshold(np.array([]), np.array([]))


def test_generator_metrics_by_hand() -> None:
    m = generator_metrics(np.array([0.1, 0.9, 0.4, 0.6]), np.array([0, 1, 1, 0]), 0.5)
    assert m["ap"] == pytest.approx(100 * (0.5 * 1 + 0.5 * 2 / 3))
    assert (m["acc"], m["real_acc"], m["fake_acc"], m["n_real"], m["n_fake"]) == (50.0, 50.0, 50.0, 2, 2)
    only_real = generator_metrics(np.array([0.1, 0.7]), np.array([0, 0]), 0.5)
    assert only_real["ap"] is None and only_real["fake_acc"] is None and only_real["real_acc"] == 50.0
    assert mean_of({"a": m, "b": only_real}, "ap") == pytest.approx(m["ap"])
    with pytest.raises(ValueError, match="no images"):
        generator_metrics(np.array([]), np.array([]), 0.5)
