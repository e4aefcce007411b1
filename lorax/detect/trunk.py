"""The detector's frozen-trunk path: run the frozen blocks below the adapted ones once per crop, train on the rest.

Every method adapts only the last ``detect.blocks`` blocks (the probe none), so the stem, the blocks below them,
the pixel features (``model.spectrum``) and the feature levels under them (``model.feature_levels``) are the same
for a crop whatever the adapters hold. :func:`encode_trunk` computes them once: the tokens entering the first
adapted block (stored in float16) and the frozen features that join the embedding (``pre``). :func:`head_logits`
finishes the forward from there, so an epoch costs the adapted blocks only (at 224 px on DINOv2-S with 3 adapted
blocks, about a quarter of the backbone's forward).

Training views are fixed in advance (:func:`train_views`): for each training image, ``n`` random crops with a flip
and the deployment augmentations (blur, JPEG, down-and-up scaling), each drawn with its probability from a seeded
generator. Augmentation must act on pixels, before the trunk, which is why the views are fixed: a new draw would
need a new trunk pass.

The head reads the features standardised by the training set's statistics (``Detector.set_feature_stats``) and can
start from a logistic regression fitted on the frozen features (:func:`fit_probe_head`): the probe's solution, and
for the adapted methods the linear-probe-then-fine-tune start that keeps the head from distorting the pretrained
features early in training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from lorax.data.dataset import ManifestDataset, to_tensor
from lorax.detect.augment import gaussian_blur, jpeg, rescale
from lorax.detect.detector import Detector

__all__ = [
    "CachedSet",
    "RobustAug",
    "encode_trunk",
    "eval_views",
    "fit_probe_head",
    "head_logits",
    "predict_cached",
    "train_cached",
    "train_views",
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

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(3)
        sigma = rng.uniform(*self.sigma_range)
        quality = int(rng.integers(self.quality_range[0], self.quality_range[1] + 1))
        scale = rng.uniform(*self.scale_range)
        if u[2] < self.scale_prob:
            img = rescale(img, scale)
        if u[0] < self.blur_prob:
            img = gaussian_blur(img, sigma)
        if u[1] < self.jpeg_prob:
            img = jpeg(img, quality)
        return img


def trunk_start(det: Detector, blocks: int) -> int:
    """Index of the first block the trunk does not run: the first adapted block, or ``depth - blocks`` for the
    probe (so every method of one ``detect.blocks`` shares one trunk cache)."""
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
    """Normalised crops (B, 3, S, S) -> (tokens entering block ``start`` as float16, frozen features (B, P))."""
    bb = det.backbone
    levels = bb.pixel_features(x)
    tokens = bb.run_blocks(bb.stem(x), 0, start, levels)
    pre = torch.cat(levels, -1) if levels else x.new_zeros(x.shape[0], 0)
    return tokens.to(torch.float16), pre.float()


def embed_from_trunk(det: Detector, tokens: torch.Tensor, pre: torch.Tensor, start: int) -> torch.Tensor:
    """The backbone's features (B, feature_dim) from the cached trunk outputs; same as ``det.backbone(x)``."""
    bb = det.backbone
    levels: list[torch.Tensor] = [pre] if pre.shape[1] else []
    out = bb.run_blocks(tokens.float(), start, None, levels)
    return bb.features(out, levels)


def head_logits(det: Detector, tokens: torch.Tensor, pre: torch.Tensor, start: int) -> torch.Tensor:
    """Logits (B,) of the detector from the cached trunk outputs; same as ``det(x)`` for the crops they came from."""
    return det.classify(embed_from_trunk(det, tokens, pre, start))


@dataclass
class CachedSet:
    """Trunk outputs of a set of crops: ``tokens`` (N, L, D) float16, ``pre`` (N, P), ``labels`` (N,) 0/1,
    ``rows`` (N,) the image each crop came from (position in its manifest frame)."""

    tokens: torch.Tensor
    pre: torch.Tensor
    labels: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _encode_arrays(det: Detector, crops: Iterable[tuple[np.ndarray, int, int]], start: int, batch_size: int,
                   device: torch.device) -> CachedSet:
    info = det.backbone.info
    toks, pres, labels, rows, batch = [], [], [], [], []

    def flush() -> None:
        if not batch:
            return
        x = torch.stack([to_tensor(np.ascontiguousarray(a), info.mean, info.std) for a, _, _ in batch]).to(device)
        t, p = encode_trunk(det, x, start)
        toks.append(t.cpu())
        pres.append(p.cpu())
        labels.extend(lab for _, lab, _ in batch)
        rows.extend(r for _, _, r in batch)
        batch.clear()

    det.eval()
    for item in crops:
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    flush()
    if not toks:
        raise ValueError("no crops to encode: the manifest frame is empty")
    return CachedSet(torch.cat(toks), torch.cat(pres), np.asarray(labels, dtype=int), np.asarray(rows, dtype=int))


def train_views(det: Detector, df: pd.DataFrame, crop: int, n_views: int, aug: RobustAug, start: int, seed: int,
                batch_size: int = 32, device: torch.device | str = "cpu", follow_links: bool = False) -> CachedSet:
    """``n_views`` fixed training views per image of ``df`` (random crop, flip, :class:`RobustAug`), encoded."""
    ds = ManifestDataset(df, train=True, crop=crop, follow_links=follow_links)
    labels = (df["class_id"].to_numpy() % 2).astype(int)
    rng = np.random.default_rng([seed, 7919])

    def gen() -> Iterable[tuple[np.ndarray, int, int]]:
        for i in range(len(df)):
            for _ in range(n_views):
                (img,) = ds.load(i, seed=int(rng.integers(0, 2**62)))
                yield aug(np.ascontiguousarray(img), rng), int(labels[i]), i

    return _encode_arrays(det, gen(), start, batch_size, torch.device(device))


def eval_views(det: Detector, df: pd.DataFrame, crop: int, n_crops: int, start: int,
               perturb: Perturb | None = None, batch_size: int = 32, device: torch.device | str = "cpu",
               follow_links: bool = False) -> CachedSet:
    """The ``n_crops`` fixed evaluation crops of every image of ``df`` (``perturb`` on each uint8 crop), encoded."""
    ds = ManifestDataset(df, train=False, crop=crop, n_crops=n_crops, follow_links=follow_links)
    labels = (df["class_id"].to_numpy() % 2).astype(int)

    def gen() -> Iterable[tuple[np.ndarray, int, int]]:
        for i in range(len(df)):
            for img in ds.load(i):
                img = np.ascontiguousarray(img)
                yield (perturb(img) if perturb is not None else img), int(labels[i]), i

    return _encode_arrays(det, gen(), start, batch_size, torch.device(device))


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


def perturbations(jpeg_qualities: Sequence[int], blur_sigmas: Sequence[float],
                  scales: Sequence[float]) -> dict[str, Perturb]:
    """Named test-time perturbations of a uint8 crop: ``jpeg<q>``, ``blur<sigma>``, ``scale<factor>``."""
    out: dict[str, Perturb] = {}
    for q in jpeg_qualities:
        out[f"jpeg{int(q)}"] = lambda img, q=int(q): jpeg(img, q)
    for s in blur_sigmas:
        out[f"blur{float(s):g}"] = lambda img, s=float(s): gaussian_blur(img, s)
    for f in scales:
        out[f"scale{float(f):g}"] = lambda img, f=float(f): rescale(img, f)
    return out
