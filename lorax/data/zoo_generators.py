"""The zoo's fake "generators": fixed, seeded decoders, each with its own upsampling path.

A generator re-synthesises a real image from a downsampled copy, as a GAN decoder renders an image from
a low-resolution code. Its structure is ``lift -> upsampling body -> readout``:

- ``lift``: a random 3x3 conv (3 -> width channels) + leaky ReLU on the low-resolution image;
- ``body``: the generator's upsampling path (transposed conv, nearest/bilinear/bicubic + conv, pixel
  shuffle, ...), random weights, then a leaky ReLU;
- ``readout``: a 3x3 conv (width -> 3) fitted by ridge regression to reproduce real images of the task's
  domain from the body's features (so the decoder is "trained": it renders the content), plus a seeded
  random 3x3 readout of the same features, zero-mean, scaled to ``artifact`` times the image's standard
  deviation (the imperfection of a real decoder; ``zoo.artifact`` sets how strong the fingerprint is).

All random weights come from (seed, generator name), so a generator is the same decoder in every run. The
periodic structure of each upsampling path and the frequency response of its random convs leave a
generator-specific spectral fingerprint, as real GANs do; the output's per-channel mean and standard
deviation are matched to the source image, so colour and brightness carry no cue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorax.data.zoo_real import Domain, rng_for, sample_real, stable_hash

WIDTH = 16  # hidden channels of every decoder
MARGIN = 3  # low-resolution pixels of reflect padding decoded around the image, then cropped away
CALIBRATION_IMAGES = 24  # real images of the domain the readout is fitted on
RIDGE = 1e-3
FIT_STRIDE = 3  # fit the readout on every 3rd pixel (coprime with the 2x/4x upsampling phases)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: its float reductions depend on the thread count, so this makes the bytes
    reproducible (and on a shared 2-core machine, small convs are faster without thread hand-offs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _conv(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, padding_mode="reflect")


def _up(mode: str, factor: int) -> nn.Module:
    return nn.Upsample(scale_factor=factor, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


@dataclass(frozen=True)
class GeneratorSpec:
    """A named decoder: its upsampling body (width -> nn.Module), the source downsampling and a description."""

    name: str
    factor: int
    description: str
    body: Callable[[int], nn.Module]


def _up_conv(mode: str, factor: int, dilation: int = 1) -> Callable[[int], nn.Module]:
    return lambda c: nn.Sequential(_up(mode, factor), _conv(c, c, dilation=dilation))


def _shuffle(factor: int) -> Callable[[int], nn.Module]:
    return lambda c: nn.Sequential(_conv(c, factor * factor * c), nn.PixelShuffle(factor))


def _deconv(k: int, n: int = 1) -> Callable[[int], nn.Module]:
    def body(c: int) -> nn.Module:
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [_act()] if i else []
            layers.append(nn.ConvTranspose2d(c, c, k, 2, 1, output_padding=k % 2))
        return layers[0] if n == 1 else nn.Sequential(*layers)

    return body


GENERATORS: dict[str, GeneratorSpec] = {
    s.name: s
    for s in [
        GeneratorSpec("deconv", 2, "transposed conv k4 s2", _deconv(4)),
        GeneratorSpec("nnconv", 2, "nearest x2 + conv 3x3", _up_conv("nearest", 2)),
        GeneratorSpec("bilinconv", 2, "bilinear x2 + conv 3x3", _up_conv("bilinear", 2)),
        GeneratorSpec("pixshuf", 2, "conv 3x3 + pixel shuffle x2", _shuffle(2)),
        GeneratorSpec("deconv3", 2, "transposed conv k3 s2", _deconv(3)),
        GeneratorSpec("bicubconv", 2, "bicubic x2 + conv 3x3", _up_conv("bicubic", 2)),
        GeneratorSpec("nnconv4", 4, "nearest x4 + conv 3x3", _up_conv("nearest", 4)),
        GeneratorSpec("pixshuf4", 4, "conv 3x3 + pixel shuffle x4", _shuffle(4)),
        GeneratorSpec("deconv2x", 4, "two transposed convs k4 s2", _deconv(4, n=2)),
        GeneratorSpec("dilconv", 2, "nearest x2 + dilated conv 3x3 (dilation 2)", _up_conv("nearest", 2, dilation=2)),
    ]
}


def get_spec(name: str) -> GeneratorSpec:
    if name not in GENERATORS:
        raise ValueError(f"unknown zoo generator {name!r}; known generators: {', '.join(GENERATORS)}")
    return GENERATORS[name]


def _init_(module: nn.Module, gen: torch.Generator) -> None:
    """Seeded He-style init of every conv, independent of torch's global RNG."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            w = m.weight
            if isinstance(m, nn.ConvTranspose2d):  # each output pixel sums ~(k/stride)^2 taps per input channel
                fan_in = w.shape[0] * max(1, (w.shape[2] // m.stride[0]) ** 2)
            else:
                fan_in = w[0].numel()
            with torch.no_grad():
                w.copy_(torch.randn(w.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def downsample(img: torch.Tensor, factor: int) -> torch.Tensor:
    """Area (box) downsampling, (B, 3, H, W) -> (B, 3, H/f, W/f)."""
    return F.avg_pool2d(img, factor) if factor > 1 else img


class Decoder(nn.Module):
    """A fixed generator: ``forward`` maps real images (B, 3, H, W) in [0, 1] to fakes of the same size."""

    def __init__(self, spec: GeneratorSpec, seed: int, artifact: float, width: int = WIDTH) -> None:
        super().__init__()
        self.spec, self.artifact = spec, artifact
        self.lift = _conv(3, width)
        self.body = spec.body(width)
        gen = torch.Generator().manual_seed(stable_hash(seed, "decoder", spec.name))
        _init_(self, gen)
        self.readout = torch.zeros(3, width * 9 + 1)  # fitted by ``fit``: (out channel, width*3*3 + bias)
        self.noise = torch.randn(3, width, 3, 3, generator=gen)  # the imperfection: a random readout
        self.requires_grad_(False)

    def hidden(self, img: torch.Tensor) -> torch.Tensor:
        """Upsampled hidden features (B, width, H+2, W+2): one extra pixel each side for the 3x3 readout."""
        f, m = self.spec.factor, MARGIN
        hgt, wid = img.shape[-2:]
        img = F.pad(img, (0, -wid % f, 0, -hgt % f), mode="replicate")  # sizes that are not multiples of f
        low = F.pad(downsample(img, f), (m, m, m, m), mode="reflect")
        h = F.leaky_relu(self.body(F.leaky_relu(self.lift(low), 0.2)), 0.2)
        return h[..., m * f - 1 : m * f + hgt + 1, m * f - 1 : m * f + wid + 1]

    def fit(self, real: torch.Tensor) -> None:
        """Ridge-fit the readout so the decoder reproduces ``real`` (a "trained" decoder)."""
        with one_thread(), torch.no_grad():
            self._fit(real)

    def _fit(self, real: torch.Tensor) -> None:
        x = F.unfold(self.hidden(real), 3).transpose(1, 2).reshape(-1, self.readout.shape[1] - 1)
        y = real.permute(0, 2, 3, 1).reshape(-1, 3)
        x, y = x[::FIT_STRIDE].double(), y[::FIT_STRIDE].double()  # a fixed pixel subset: 3x faster, same fit
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        a = x.T @ x
        a += RIDGE * torch.trace(a) / a.shape[0] * torch.eye(a.shape[0], dtype=a.dtype)
        self.readout = torch.linalg.solve(a, x.T @ y).T.float()  # (3, width*9+1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        with one_thread():
            return self._forward(img)

    def _forward(self, img: torch.Tensor) -> torch.Tensor:
        h = self.hidden(img)
        weight = self.readout[:, :-1].reshape(3, -1, 3, 3)  # same (channel, ky, kx) order as F.unfold
        out = F.conv2d(h, weight, self.readout[:, -1])
        if self.artifact:
            # the random readout renders the upsampling path's structure unsmoothed; zero-mean per channel
            # (no colour shift), scaled to ``artifact`` times the image's own standard deviation
            art = F.conv2d(h, self.noise)
            art = art - art.mean((2, 3), keepdim=True)
            ratio = out.std((1, 2, 3), keepdim=True) / (art.std((1, 2, 3), keepdim=True) + 1e-6)
            out = out + self.artifact * ratio * art
        # match each channel's mean and std to the source: colour and brightness carry no cue
        mu, sd = img.mean((2, 3), keepdim=True), img.std((2, 3), keepdim=True)
        omu, osd = out.mean((2, 3), keepdim=True), out.std((2, 3), keepdim=True)
        return ((out - omu) / (osd + 1e-6) * sd + mu).clamp(0.0, 1.0)


def build_decoder(name: str, seed: int, domain: Domain, size: int, artifact: float) -> Decoder:
    """The generator ``name``, its readout fitted on calibration images of ``domain`` (its own stream)."""
    dec = Decoder(get_spec(name), seed, artifact)
    rng = rng_for(seed, "calibration", name)
    cal = np.stack([sample_real(rng, domain, size) for _ in range(CALIBRATION_IMAGES)])
    dec.fit(to_tensor(cal))
    return dec


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) float in [0, 1] -> (B, 3, H, W) float32 (the decoders' dtype: 4-6x faster than float64)."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
