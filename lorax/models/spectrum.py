"""Residual spectrum (``model.spectrum``): a parameter-free pixel feature that joins every embedding.

Generators leave periodic traces in the high frequencies (up-sampling grids, decoder filters) that a ViT, trained
for semantics and fed 14 px patches, pools away. The log power spectrum of the grey-level high-pass residual
(image minus its Gaussian blur), averaged into a ``grid x grid`` map, keeps them: on the train split of the
real-world set it attributes about as well as DINOv2's multi-level tokens, and the two together better than either
(docs/results.md, "Residual spectrum"). Frozen and computed from the crop itself, it is shared by every task (in
LoRAX it is part of the trunk, like the feature levels below the first adapter).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian of radius ``ceil(4 sigma)`` (scipy's default truncation), summing to 1."""
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


class ResidualSpectrum(nn.Module):
    """(B, 3, S, S) normalised crops -> (B, grid * grid): log power spectrum of the grey high-pass residual, centred
    (``fftshift``) and average-pooled to ``grid x grid``. The crop's normalisation is undone per channel (pixels on
    a 0-255 scale), so the feature is the same whatever the backbone's mean and std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], grid: int = 28, sigma: float = 1.0) -> None:
        super().__init__()
        self.grid, self.sigma = int(grid), float(sigma)
        grey = torch.tensor(GREY) * torch.tensor(std, dtype=torch.float32) * 255.0
        self.register_buffer("grey", grey.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("offset", (torch.tensor(GREY) * torch.tensor(mean, dtype=torch.float32)).sum() * 255.0,
                             persistent=False)
        self.register_buffer("kernel", gaussian_kernel(sigma), persistent=False)

    @property
    def dim(self) -> int:
        return self.grid * self.grid

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) grey image minus its Gaussian blur (reflected borders)."""
        g = (x.float() * self.grey).sum(1, keepdim=True) + self.offset
        r = self.kernel.numel() // 2
        k = self.kernel.to(g.device)
        b = F.conv2d(F.pad(g, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        b = F.conv2d(F.pad(b, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
        return g - b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        if x.shape[-2] != s or s % self.grid:
            raise ValueError(f"model.spectrum: grid {self.grid} must divide the square crop ({tuple(x.shape[-2:])})")
        with torch.autocast(x.device.type, enabled=False):  # FFT in float32 whatever the caller's precision
            power = torch.fft.fftshift(torch.fft.fft2(self.residual(x)), dim=(-2, -1)).abs().square()
            return F.avg_pool2d(torch.log(power + 1e-3), s // self.grid).flatten(1)
