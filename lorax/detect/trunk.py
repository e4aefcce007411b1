"""The detector's frozen-trunk path: run the frozen blocks below the adapted ones once per crop, train on the rest.

Every method adapts only the last ``detect.blocks`` blocks (the probe none), so the stem, the blocks below them,
the pixel features (``model.spectrum``) and the feature levels under them (``model.feature_levels``) are the same
for a crop whatever the adapters hold. :func:`encode_trunk` computes them once: the tokens entering the first
adapted block and the frozen features that join the embedding (``pre``), both float32. :func:`head_logits`
finishes the forward from there, so an epoch costs the adapted blocks only (at 224 px on DINOv2-S with 3 adapted
blocks, about a quarter of the backbone's forward).

Training views are fixed in advance (``detect.views`` per image, :mod:`lorax.detect.trunk_features`, which keeps
the trunk's outputs in the feature store): a random crop with a flip and the deployment augmentations
(:class:`RobustAug`: blur, JPEG, down-and-up scaling), each drawn with its probability. Augmentation must act on
pixels, before the trunk, which is why the views are fixed: a new draw would need a new trunk pass.

The head reads the features standardised by the training set's statistics (``Detector.set_feature_stats``) and can
start from a logistic regression fitted on the frozen features (:func:`fit_probe_head`): the probe's solution, and
for the adapted methods the linear-probe-then-fine-tune start that keeps the head from distorting the pretrained
features early in training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from lorax.detect.augment import gaussian_blur, jpeg, rescale
from lorax.detect.detector import Detector

__all__ = [
    "CachedSet",
    "RobustAug",
    "encode_trunk",
    "fit_probe_head",
    "head_logits",
    "perturbation",
    "perturbations",
    "predict_cached",
    "train_cached",
    "trunk_start",
]

Perturb = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RobustAug:
    """Deployment augmentation of one training view: blur (sigma ~ U[sigma_range]), JPEG (quality ~
    U{quality_range}), down-and-up scaling (factor ~ U[scale_range]), each with its own probability. Six values
    are drawn per view whatever happens, so a seed fixes every view."""

    blur_prob: float = 0.3
    jpeg_prob: float = 0.3
    scale_prob: float = 0.2
    sigma_range: tuple[float, float] = (0.0, 3.0)
    quality_range: tuple[int, int] = (30, 100)
    scale_range: tuple[float, float] = (0.5, 1.0)

    def draw(self, rng: np.random.Generator) -> list[list[Any]]:
        """The operations one view gets, in the order they apply: ``[[name, value], ...]`` (scale, blur, jpeg)."""
        u = rng.random(3)
        sigma = float(rng.uniform(*self.sigma_range))
        quality = int(rng.integers(self.quality_range[0], self.quality_range[1] + 1))
        scale = float(rng.uniform(*self.scale_range))
        ops: list[list[Any]] = []
        if u[2] < self.scale_prob:
            ops.append(["scale", scale])
        if u[0] < self.blur_prob:
            ops.append(["blur", sigma])
        if u[1] < self.jpeg_prob:
            ops.append(["jpeg", quality])
        return ops

    @staticmethod
    def apply(img: np.ndarray, ops: list[list[Any]]) -> np.ndarray:
        """``img`` after the drawn operations (:meth:`draw`)."""
        for name, value in ops:
            img = OPS[name](img, value)
        return img

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(img, self.draw(rng))


OPS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {"scale": rescale, "blur": gaussian_blur, "jpeg": jpeg}


def trunk_start(det: Detector, blocks: int) -> int:
    """Index of the first block the trunk does not run: the first adapted block, or ``depth - blocks`` for the
    probe (so every method of one ``detect.blocks`` reads the same stored trunk outputs)."""
    depth = det.backbone.depth
    start = depth - (blocks or depth)
    for name in det.mole:
        prefix = name.split(".mlp.")[0].split(".attn.")[0] + "."
        idx = [i for i in range(depth) if det.backbone.block_prefix(i) == prefix]
        if idx and idx[0] < start:
            raise ValueError(f"detector adapts block {idx[0]}, below the trunk's end {start}")
    return start


@torch.no_grad()
def encode_trunk(det: Detector, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised crops (B, 3, S, S) -> (tokens entering block ``start`` (B, L, D), frozen features (B, P)),
    float32."""
    bb = det.backbone
    levels = bb.pixel_features(x)
    tokens = bb.run_blocks(bb.stem(x), 0, start, levels)
    pre = torch.cat(levels, -1) if levels else x.new_zeros(x.shape[0], 0)
    return tokens.float(), pre.float()


def embed_from_trunk(det: Detector, tokens: torch.Tensor, pre: torch.Tensor, start: int) -> torch.Tensor:
    """The backbone's features (B, feature_dim) from the stored trunk outputs; same as ``det.backbone(x)``."""
    bb = det.backbone
    levels: list[torch.Tensor] = [pre] if pre.shape[1] else []
    out = bb.run_blocks(tokens.float(), start, None, levels)
    return bb.features(out, levels)


def head_logits(det: Detector, tokens: torch.Tensor, pre: torch.Tensor, start: int) -> torch.Tensor:
    """Logits (B,) of the detector from the stored trunk outputs; same as ``det(x)`` for the crops they came from."""
    return det.classify(embed_from_trunk(det, tokens, pre, start))


@dataclass
class CachedSet:
    """Trunk outputs of a set of crops (in memory; :mod:`lorax.detect.trunk_features` reads them from the feature
    store): ``tokens`` (N, L, D) and ``pre`` (N, P) float32, ``labels`` (N,) 0/1, ``rows`` (N,) the image each crop
    came from (position in its manifest frame)."""

    tokens: torch.Tensor
    pre: torch.Tensor
    labels: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def _embed_all(det: Detector, cached: CachedSet, start: int, batch_size: int, device: torch.device) -> torch.Tensor:
    det.eval()
    out = [embed_from_trunk(det, cached.tokens[i:i + batch_size].to(device), cached.pre[i:i + batch_size].to(device),
                            start).float().cpu() for i in range(0, len(cached), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def predict_cached(det: Detector, cached: CachedSet, start: int, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Fake probability per image (mean of its crops' logits, then the sigmoid), indexed by row 0..max(rows)."""
    device = torch.device(device)
    logits = det.classify(_embed_all(det, cached, start, batch_size, device).to(device)).float().cpu().numpy()
    n = int(cached.rows.max()) + 1
    sums, counts = np.zeros(n), np.zeros(n)
    np.add.at(sums, cached.rows, logits)
    np.add.at(counts, cached.rows, 1)
    return 1.0 / (1.0 + np.exp(-sums / np.maximum(counts, 1)))


def fit_probe_head(det: Detector, cached: CachedSet, start: int, c: float, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> None:
    """Set the feature statistics from the frozen features of ``cached`` and the head to the L2 logistic
    regression (inverse strength ``c``, balanced classes) on the standardised features."""
    from sklearn.linear_model import LogisticRegression

    feats = _embed_all(det, cached, start, batch_size, torch.device(device))
    mean, std = feats.mean(0), feats.std(0).clamp(min=1e-6)
    det.set_feature_stats(mean, std)
    z = ((feats - mean) / std).numpy()
    lr = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
    lr.fit(z, cached.labels)
    with torch.no_grad():
        det.head.weight.copy_(torch.as_tensor(lr.coef_, dtype=det.head.weight.dtype))
        det.head.bias.copy_(torch.as_tensor(lr.intercept_, dtype=det.head.bias.dtype))


def train_cached(det: Detector, cached: CachedSet, start: int, epochs: int, lr: float, batch_size: int,
                 balance_weight: float, seed: int, weight_decay: float = 0.01, head_lr_scale: float = 1.0,
                 device: torch.device | str = "cpu",
                 callback: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train the adapters (and the head, at ``lr * head_lr_scale``) on cached views: BCE with balanced class
    weights + ``balance_weight`` x the routers' load-balancing loss; AdamW, cosine decay to 0. Returns per-epoch
    figures (loss, bce, balance, seconds)."""
    device = torch.device(device)
    adapters = [p for n, p in det.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": list(det.head.parameters()), "lr": lr * head_lr_scale}]
    if adapters:
        groups.append({"params": adapters, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    n = len(cached)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(epochs * steps_per_epoch, 1)
    base = [g["lr"] for g in opt.param_groups]
    pos = float(cached.labels.mean())
    pos_weight = torch.tensor((1 - pos) / max(pos, 1e-6), device=device)
    gen = torch.Generator().manual_seed(seed)
    history, step = [], 0
    for epoch in range(epochs):
        det.train()
        t0, sums, seen = time.perf_counter(), {"loss": 0.0, "bce": 0.0, "balance": 0.0}, 0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            for g, b in zip(opt.param_groups, base, strict=True):
                g["lr"] = b * 0.5 * (1 + math.cos(math.pi * step / total))
            tokens, pre = cached.tokens[idx].to(device), cached.pre[idx].to(device)
            y = torch.as_tensor(cached.labels[idx.numpy()], dtype=torch.float32, device=device)
            logits = head_logits(det, tokens, pre, start)
            bce = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight)
            bal = det.balance_loss().float()
            loss = bce + balance_weight * bal
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detector training diverged at epoch {epoch + 1}; lower detect.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(idx)
            for k, v in (("loss", loss), ("bce", bce), ("balance", bal)):
                sums[k] += float(v.detach()) * len(idx)
        logs = {k: v / max(seen, 1) for k, v in sums.items()} | {"epoch_seconds": time.perf_counter() - t0}
        history.append(logs)
        if callback is not None:
            callback(epoch, logs)
    det.eval()
    return history


_PERTURB = {"jpeg": (jpeg, "quality", int), "blur": (gaussian_blur, "sigma", float),
            "scale": (rescale, "factor", float)}


def perturbation(name: str) -> Perturb:
    """The test-time perturbation a name means: ``jpeg<q>`` (quality), ``blur<sigma>``, ``scale<factor>``; the name
    is all of it (it is part of a stored view's id)."""
    for prefix, (fn, arg, cast) in _PERTURB.items():
        if name.startswith(prefix):
            try:
                return partial(fn, **{arg: cast(name[len(prefix):])})
            except ValueError:
                break
    raise ValueError(f"unknown perturbation {name!r}: expected jpeg<quality>, blur<sigma> or scale<factor>")


def perturbations(jpeg_qualities: Sequence[int], blur_sigmas: Sequence[float],
                  scales: Sequence[float]) -> dict[str, Perturb]:
    """Named test-time perturbations of a uint8 crop: ``jpeg<q>``, ``blur<sigma>``, ``scale<factor>``."""
    names = [f"jpeg{int(q)}" for q in jpeg_qualities] + [f"blur{float(s):g}" for s in blur_sigmas] + \
        [f"scale{float(f):g}" for f in scales]
    return {n: perturbation(n) for n in names}
