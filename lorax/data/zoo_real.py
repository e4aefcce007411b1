"""Real-image domains of the built-in zoo: photos bundled with scikit-image plus procedural images.

Every task draws its real images (and the sources its generator re-synthesises) from its own
``Domain``: a few bundled photos, seen through random crops, rescales and flips, mixed with dead-leaves
and 1/f-noise images whose parameters are the domain's own. Nothing is downloaded: only samples that
scikit-image ships inside its wheel are used.

Every image then gets a random colour and brightness jitter (hue rotation, saturation, luminance mean and
contrast) drawn from one distribution shared by all domains. Domains thus differ in content and texture
(second-order statistics), not in average colour, so a linear model on colour thumbnails cannot tell tasks,
or real from fake, apart.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

# skimage.data samples that ship in the wheel (no pooch / network needed). Grey ones get a random tint.
COLOUR_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
)
GREY_PHOTOS = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock", "cell")
PHOTOS = COLOUR_PHOTOS + GREY_PHOTOS

_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def stable_hash(*parts: object) -> int:
    """A 32-bit hash of ``parts`` that, unlike ``hash()``, is the same in every process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """An independent random stream per (seed, purpose...): changing one count never shifts another stream."""
    return np.random.default_rng([seed, stable_hash(*parts)])


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A bundled photo as float32 HxWx3 in [0, 1] (grey photos are replicated to three channels)."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"unknown photo source {name!r}; known: {', '.join(PHOTOS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.float32)
    return img / 255.0 if img.max() > 1.0 else img


@dataclass(frozen=True)
class Domain:
    """What a task's real images look like; derived from (seed, task name) by ``domain_for``."""

    photos: tuple[str, ...]
    photo_share: float  # share of photo crops; the rest is procedural
    leaves_share: float  # share of dead-leaves among the procedural images (the rest: 1/f noise)
    scale: tuple[float, float]  # output size / crop side in the photo (rescale range)
    leaves_alpha: float  # radius power-law exponent of the dead-leaves model
    leaves_radius: tuple[float, float]  # min, max leaf radius as a share of the image side
    leaves_square: float  # share of square leaves (the rest are disks)
    noise_beta: float  # amplitude spectrum ~ 1/f^beta of the noise textures

    def describe(self) -> dict:
        return asdict(self)


def domain_for(seed: int, task: str) -> Domain:
    """The task's own real domain, a pure function of (seed, task name)."""
    rng = rng_for(seed, "domain", task)
    n_colour = int(rng.integers(1, 3))
    photos = tuple(rng.choice(COLOUR_PHOTOS, n_colour, replace=False)) + tuple(
        rng.choice(GREY_PHOTOS, 3 - n_colour, replace=False)
    )
    lo = float(rng.uniform(0.1, 0.25))
    rmin = float(rng.uniform(0.01, 0.04))
    return Domain(
        photos=tuple(str(p) for p in photos),
        photo_share=round(float(rng.uniform(0.4, 0.7)), 3),
        leaves_share=round(float(rng.uniform(0.5, 0.8)), 3),
        scale=(round(lo, 3), round(min(1.0, lo * float(rng.uniform(2.0, 4.0))), 3)),
        leaves_alpha=round(float(rng.uniform(2.0, 3.5)), 3),
        leaves_radius=(round(rmin, 3), round(float(rng.uniform(0.15, 0.5)), 3)),
        leaves_square=round(float(rng.uniform(0.0, 1.0)), 3),
        noise_beta=round(float(rng.uniform(0.8, 1.6)), 3),
    )


def photo_crop(rng: np.random.Generator, name: str, size: int, scale: tuple[float, float]) -> np.ndarray:
    """A random square crop of a bundled photo, rescaled (antialiased) to ``size`` and randomly flipped."""
    photo = load_photo(name)
    h, w = photo.shape[:2]
    for _ in range(8):  # skip flat crops (night sky, background): nothing for a generator to render
        side = max(8, min(int(round(size / rng.uniform(*scale))), h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = (photo[y : y + side, x : x + side] * 255.0).round().astype(np.uint8)
        if crop.std() >= 8.0:
            break
    img = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64) / 255
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.25:
        img = img[::-1]
    if name in GREY_PHOTOS:  # no hue to rotate: give it a random tint that follows the luminance
        grey = img[..., 0]
        u, v = rng.normal(0.0, 0.08, 2), rng.normal(0.0, 0.3, 2)
        chroma = u[None, None] + v[None, None] * (grey - grey.mean())[..., None]
        img = np.concatenate([grey[..., None], chroma], axis=2) @ _YIQ2RGB.T
    return np.ascontiguousarray(img)


def dead_leaves(rng: np.random.Generator, size: int, d: Domain, supersample: int = 2) -> np.ndarray:
    """A colour dead-leaves image (occluding disks/squares, power-law radii): scale-invariant like photos."""
    n = size * supersample
    rmin, rmax = d.leaves_radius
    k = min(400, 64 + int(4 / rmin))  # enough leaves to (nearly) cover the image
    # inverse-CDF sampling of p(r) ~ r^-alpha on [rmin, rmax]
    a = 1.0 - d.leaves_alpha
    u = rng.random(k)
    r = ((rmax**a - rmin**a) * u + rmin**a) ** (1.0 / a) * n
    cy, cx = rng.uniform(-0.1, 1.1, (2, k)) * n
    square = rng.random(k) < d.leaves_square
    colours = rng.random((k, 3)) ** 1.3
    img = np.empty((n, n, 3))
    img[:] = rng.random(3)  # background where no leaf falls
    covered = np.zeros((n, n), dtype=bool)
    ar = np.arange(n, dtype=np.float64) + 0.5
    for i in range(k):  # leaf 0 is on top: paint front to back, only where nothing is yet
        y0, y1 = max(0, int(cy[i] - r[i])), min(n, int(cy[i] + r[i]) + 1)
        x0, x1 = max(0, int(cx[i] - r[i])), min(n, int(cx[i] + r[i]) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = ar[y0:y1, None] - cy[i], ar[None, x0:x1] - cx[i]
        inside = np.maximum(np.abs(dy), np.abs(dx)) <= r[i] if square[i] else dy**2 + dx**2 <= r[i] ** 2
        cov = covered[y0:y1, x0:x1]
        inside &= ~cov
        img[y0:y1, x0:x1][inside] = colours[i]
        cov |= inside
        if i % 32 == 31 and covered.all():
            break
    # a faint texture inside the leaves, then average down (antialiasing)
    img = img + 0.03 * rng.standard_normal((n, n, 1))
    return img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))


def noise_texture(rng: np.random.Generator, size: int, d: Domain) -> np.ndarray:
    """A 1/f^beta random-phase texture (luminance plus weaker, smoother chroma)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    chans = []
    for beta, amp in ((d.noise_beta, 1.0), (d.noise_beta + 0.5, 0.5), (d.noise_beta + 0.5, 0.5)):
        spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f**beta
        spec[0, 0] = 0.0
        c = np.fft.irfft2(spec, s=(size, size))
        chans.append(amp * c / (c.std() + 1e-12))
    yiq = np.stack(chans, axis=2) * np.array([0.18, 0.08, 0.08]) + np.array([0.5, 0.0, 0.0])
    return yiq @ _YIQ2RGB.T


def colour_jitter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Random hue rotation, saturation, luminance mean and contrast, from one distribution for all domains."""
    yiq = img @ _RGB2YIQ.T
    theta, sat = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.5, 1.2)
    c, s = np.cos(theta), np.sin(theta)
    rot = sat * np.array([[c, -s], [s, c]])
    y = yiq[..., 0]
    mean, std = rng.uniform(0.3, 0.65), rng.uniform(0.1, 0.22)
    y = (y - y.mean()) * (std / max(float(y.std()), 0.02)) + mean
    out = np.concatenate([y[..., None], yiq[..., 1:] @ rot.T], axis=2) @ _YIQ2RGB.T
    return np.clip(out, 0.0, 1.0)


def sample_real(rng: np.random.Generator, d: Domain, size: int) -> np.ndarray:
    """One real image of domain ``d``: float64 HxWx3 in [0, 1]."""
    u = rng.random()
    if u < d.photo_share:
        img = photo_crop(rng, str(rng.choice(d.photos)), size, d.scale)
    elif u < d.photo_share + (1.0 - d.photo_share) * d.leaves_share:
        img = dead_leaves(rng, size, d)
    else:
        img = noise_texture(rng, size, d)
    return colour_jitter(rng, img)
