"""Trace experts (``trace:`` settings): what a generator leaves in the pixels, read at native resolution.

A semantic backbone is trained to ignore the decoder's traces that tell generators apart when they drew the same
prompts. A :class:`TraceExpert` reads them: ``P`` patches of ``patch`` px cut from the decoded image as stored (never
resized; :mod:`lorax.data.patches`), a fixed high-pass front end (each colour channel minus its Gaussian blur, the
kernel of :mod:`lorax.models.spectrum`; no parameters, no gradient), a stem 3x3 convolution and ``depth`` residual
blocks of two 3x3 convolutions (GroupNorm: no running statistics, so a frozen expert gives the same output whatever
the batch), global average pooling per patch, a linear map to ``dim`` and the mean over the image's patches.

One expert per task, trained in its task and then frozen (lorax/continual/trace_methods.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorax.models.spectrum import gaussian_kernel


class HighPass(nn.Module):
    """(N, 3, H, W) pixels on a 0-255 scale -> (N, 3, H, W) residual: each channel minus its separable Gaussian blur
    (reflected borders), divided by 255. Fixed: the kernel is a non-persistent buffer, nothing here trains."""

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("kernel", gaussian_kernel(sigma), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        c = x.shape[1]
        k = self.kernel.to(x.device)
        r = k.numel() // 2
        b = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        b = F.conv2d(F.pad(b, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return x - b


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class _Block(nn.Module):
    """Two 3x3 convolutions with a skip connection (a strided 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.skip(x))


class TraceExpert(nn.Module):
    """(B, P, 3, p, p) native-resolution patches (uint8 or float, 0-255) -> (B, dim) image embeddings."""

    def __init__(self, width: int = 32, depth: int = 2, dim: int = 64, sigma: float = 1.0) -> None:
        super().__init__()
        self.highpass = HighPass(sigma)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), _norm(width), nn.ReLU())
        blocks, ch = [], width
        for i in range(depth):
            out = ch if i == 0 else ch * 2
            blocks.append(_Block(ch, out, 1 if i == 0 else 2))
            ch = out
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(ch, dim)
        self.dim = int(dim)

    @classmethod
    def from_settings(cls, trace) -> TraceExpert:
        """An expert of the ``trace:`` settings (:class:`lorax.config.TraceConfig`)."""
        return cls(trace.width, trace.depth, trace.dim, trace.sigma)

    def patch_embeddings(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 3, p, p) patches -> (N, dim)."""
        with torch.no_grad():  # the fixed front end: never part of the graph
            r = self.highpass(patches)
        h = self.blocks(self.stem(r))
        return self.proj(h.mean((-2, -1)))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if patches.dim() != 5:
            raise ValueError(f"trace expert: expected (batch, patches, 3, p, p), got {tuple(patches.shape)}")
        b, n = patches.shape[:2]
        return self.patch_embeddings(patches.flatten(0, 1)).view(b, n, -1).mean(1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
