"""Gaussian blur and JPEG: the detector's training augmentation and its test-time perturbations.

CNNSpot (Wang et al. 2020), UnivFD and CLIP-MoLE train with blur (sigma ~ U[0, 3]) and JPEG (quality ~ U{30..100}),
each applied with probability p (0.1 in CLIP-MoLE), and report robustness under fixed test-time blur sigmas and JPEG
qualities. Both act on uint8 RGB pixels: the blur is ``scipy.ndimage.gaussian_filter`` per channel (as CNNSpot),
the JPEG a Pillow encode/decode. They are applied to the crop the model sees (the loader crops first), so the JPEG
8x8 grid is aligned to the crop, not to the original image.

Batches from :func:`lorax.data.dataset.make_loader` are normalised float tensors; :func:`perturb_batch` maps them
back to exact uint8 pixels, applies a function per image and normalises again. Randomness comes only from the numpy
``Generator`` passed in, which always draws the same number of values per image, so a seed fixes the result.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

__all__ = ["BlurJpeg", "augment_batch", "from_pixels", "gaussian_blur", "jpeg", "perturb_batch", "rescale",
           "to_pixels"]


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """HxWx3 uint8 -> Gaussian-blurred uint8 (standard deviation ``sigma`` px, reflected borders)."""
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return img
    out = gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """HxWx3 uint8 -> the same image after a JPEG round trip at ``quality`` (1..100, Pillow's 4:2:0 default)."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy()


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """HxWx3 uint8 -> the image downscaled by ``factor`` (Pillow bicubic, antialiased) and scaled back to HxW
    (bilinear): the detail a downscaled upload keeps, at the size the detector reads."""
    if not 0 < factor <= 1:
        raise ValueError(f"rescale factor must be in (0, 1], got {factor}")
    if factor == 1:
        return img
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((max(1, round(w * factor)), max(1, round(h * factor))),
                                        Image.Resampling.BICUBIC)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR)).copy()


@dataclass(frozen=True)
class BlurJpeg:
    """Training augmentation: blur with probability ``prob`` (sigma ~ U[sigma_range]), then JPEG with probability
    ``prob`` (quality ~ U{quality_range}). Four values are drawn per image whatever happens."""

    prob: float = 0.1
    sigma_range: tuple[float, float] = (0.0, 3.0)
    quality_range: tuple[int, int] = (30, 100)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u_blur, sigma, u_jpeg = rng.random(), rng.uniform(*self.sigma_range), rng.random()
        quality = int(rng.integers(self.quality_range[0], self.quality_range[1] + 1))
        if u_blur < self.prob:
            img = gaussian_blur(img, sigma)
        if u_jpeg < self.prob:
            img = jpeg(img, quality)
        return img


def _stats(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return m, s


def to_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (B, 3, H, W) -> uint8 (B, H, W, 3); exact for tensors made from uint8 pixels."""
    m, s = _stats(x, mean, std)
    px = ((x * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return px.permute(0, 2, 3, 1).cpu().numpy()


def from_pixels(px: np.ndarray, mean: Sequence[float], std: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(px)).to(like.device).permute(0, 3, 1, 2).to(like.dtype) / 255.0
    m, s = _stats(like, mean, std)
    return (t - m) / s


def perturb_batch(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    fn: Callable[[np.ndarray], np.ndarray],
) -> torch.Tensor:
    """Apply ``fn`` (uint8 HxWx3 -> uint8 HxWx3) to every image of a normalised batch; returns a new batch."""
    px = to_pixels(x, mean, std)
    out = np.stack([fn(im) for im in px])
    return from_pixels(out, mean, std, x)


def augment_batch(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    aug: BlurJpeg,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Training augmentation of a normalised batch; images the augmentation left alone are returned untouched."""
    if aug.prob <= 0:
        return x
    px = to_pixels(x, mean, std)
    outs = [aug(im, rng) for im in px]
    changed = [i for i, (a, b) in enumerate(zip(outs, px, strict=True)) if a is not b]
    if not changed:
        return x
    x = x.clone()
    x[changed] = from_pixels(np.stack([outs[i] for i in changed]), mean, std, x)
    return x
