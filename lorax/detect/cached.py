"""Detector training and scoring through the frozen-trunk cache (``detect.trunk_cache``).

:class:`TrunkStore` encodes crops once (:mod:`lorax.detect.trunk`) and keeps them on disk, content-addressed by the
backbone settings, the trunk's end, the crop settings and the images' hashes, so every method of a comparison, every
fold of a cross-validation and a re-run read the same tensors. :func:`fit_detector` trains one method on cached
training views (head from the probe's logistic regression, then the adapters and the head); :func:`score_frame`
scores a manifest frame, clean or perturbed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from lorax.detect.config import DetectConfig
from lorax.detect.detector import Detector, build_detector
from lorax.detect.trunk import (
    CachedSet,
    Perturb,
    RobustAug,
    eval_views,
    fit_probe_head,
    predict_cached,
    train_cached,
    train_views,
    trunk_start,
)
from lorax.models.config import ModelConfig
from lorax.utils.io import atomic_path

__all__ = ["TrunkStore", "aug_of", "fit_detector", "score_frame"]

log = logging.getLogger(__name__)


def aug_of(cfg: DetectConfig) -> RobustAug:
    """The training views' augmentation: blur and JPEG each with ``detect.aug_prob`` (sigma ~ U[0, 3], quality ~
    U{30..100}, as CNNSpot / CLIP-MoLE), down-and-up scaling with ``detect.aug_scale_prob`` (factor ~ U[0.5, 1])."""
    return RobustAug(blur_prob=cfg.aug_prob, jpeg_prob=cfg.aug_prob, scale_prob=cfg.aug_scale_prob)


class TrunkStore:
    """Cached trunk outputs of manifest frames under ``root`` (safe to delete; never stale: the key covers the
    backbone settings, the trunk's end, crops, views, augmentation, seed, perturbation and every image's sha256)."""

    def __init__(self, root: str | Path | None, model_cfg: ModelConfig, detect_cfg: DetectConfig,
                 device: torch.device | str = "cpu", batch_size: int = 32, follow_links: bool = False) -> None:
        self.root = Path(root) if root is not None else None
        self.model_cfg, self.cfg = model_cfg, detect_cfg
        self.device, self.batch_size, self.follow_links = torch.device(device), batch_size, follow_links
        self.encoder = build_detector(model_cfg, detect_cfg, "probe").to(self.device).eval()
        self.start = trunk_start(self.encoder, detect_cfg.blocks)

    def _key(self, df: pd.DataFrame, **what: object) -> str:
        h = hashlib.sha256(self.model_cfg.model_dump_json().encode())
        h.update(json.dumps({"start": self.start, "crop": self.model_cfg.img_size, **what}, sort_keys=True,
                            default=str).encode())
        h.update("\n".join(df["sha256"].astype(str)).encode())
        return h.hexdigest()[:24]

    def _cached(self, key: str, make: Callable[[], CachedSet]) -> CachedSet:
        path = self.root / f"{key}.safetensors" if self.root is not None else None
        if path is not None and path.is_file():
            t = load_file(str(path))
            return CachedSet(t["tokens"], t["pre"], t["labels"].numpy(), t["rows"].numpy())
        cs = make()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"tokens": cs.tokens.contiguous(), "pre": cs.pre.contiguous(),
                           "labels": torch.as_tensor(cs.labels), "rows": torch.as_tensor(cs.rows)}, str(tmp))
        return cs

    def train(self, df: pd.DataFrame, seed: int) -> CachedSet:
        """``detect.views`` augmented training views per image of ``df``."""
        aug = aug_of(self.cfg)
        key = self._key(df, kind="train", views=self.cfg.views, aug=asdict(aug), seed=seed)
        return self._cached(key, lambda: train_views(self.encoder, df, self.model_cfg.img_size, self.cfg.views, aug,
                                                     self.start, seed, self.batch_size, self.device,
                                                     self.follow_links))

    def eval(self, df: pd.DataFrame, perturb: tuple[str, Perturb] | None = None, n_crops: int | None = None
             ) -> CachedSet:
        """The fixed evaluation crops (``detect.eval_crops``) of every image of ``df``, optionally perturbed
        (``(name, fn)``: the name is part of the key)."""
        n = n_crops or self.cfg.eval_crops
        key = self._key(df, kind="eval", crops=n, perturb=perturb[0] if perturb else None)
        return self._cached(key, lambda: eval_views(self.encoder, df, self.model_cfg.img_size, n, self.start,
                                                    perturb[1] if perturb else None, self.batch_size, self.device,
                                                    self.follow_links))


def fit_detector(model_cfg: ModelConfig, cfg: DetectConfig, method: str, train: CachedSet, start: int, seed: int,
                 device: torch.device | str = "cpu", probe_c: float | None = None,
                 callback: Callable[[int, dict[str, float]], None] | None = None
                 ) -> tuple[Detector, list[dict[str, float]]]:
    """A detector of ``method`` trained on cached views: the head starts as the probe (logistic regression with C
    = ``probe_c`` or ``detect.probe_c`` on the standardised frozen features; ``detect.head_init: zero``: at zero,
    standardisation kept); every method but the probe then trains its adapters and head for ``detect.epochs``."""
    det = build_detector(model_cfg, cfg, method, seed=seed).to(device)
    fit_probe_head(det, train, start, probe_c if probe_c is not None else cfg.probe_c, device=device)
    if method != "probe" and cfg.head_init == "zero":  # keep the feature statistics, drop the probe's solution
        with torch.no_grad():
            det.head.weight.zero_()
            det.head.bias.zero_()
    history: list[dict[str, float]] = []
    if method != "probe":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            history = train_cached(det, train, start, cfg.epochs, cfg.lr, cfg.batch_size, cfg.balance_weight,
                                   seed, weight_decay=cfg.weight_decay, head_lr_scale=cfg.head_lr_scale,
                                   device=device, callback=callback)
    det.eval()
    return det, history


def score_frame(det: Detector, cached: CachedSet, start: int, n_rows: int, device: torch.device | str = "cpu"
                ) -> np.ndarray:
    """Fake probability of every row of the frame ``cached`` was made from (``n_rows`` rows)."""
    s = predict_cached(det, cached, start, device=device)
    if len(s) != n_rows:
        raise ValueError(f"cached crops cover {len(s)} rows, the frame has {n_rows}")
    return s


def _labels(df: pd.DataFrame) -> np.ndarray:
    return (df["class_id"].to_numpy() % 2).astype(int)


def run_cached(params, train_df: pd.DataFrame, val_parts: dict[str, pd.DataFrame],
               eval_parts: dict[str, pd.DataFrame], extra_parts: dict[str, dict[str, pd.DataFrame]], method: str,
               device: torch.device, callback: Callable[[int, dict[str, float]], None] | None = None
               ) -> tuple[Detector, float, dict, pd.DataFrame]:
    """:func:`lorax.detect.runner.run_detect`'s training and scoring through the trunk cache (``detect.trunk_cache``).

    Returns the detector, the threshold (fitted on the training generators' val split), the metrics that depend on
    the path (``per_generator``, ``map``, ``mean_acc``, ``seen``, ``robustness`` {blur, jpeg, scale}, ``extra``,
    ``history``, ``train_seconds``, ``trunk_seconds``) and the per-image score table.
    """
    import time

    from lorax.detect import evaluate as E
    from lorax.detect.trunk import perturbations

    cfg, model_cfg = params.detect, params.model
    store = TrunkStore(cfg.trunk_cache_dir, model_cfg, cfg, device=device, batch_size=params.eval.batch_size,
                       follow_links=params.data.follow_links)
    t0 = time.perf_counter()
    views = store.train(train_df, params.seed)
    trunk_s = time.perf_counter() - t0
    det, history = fit_detector(model_cfg, cfg, method, views, store.start, params.seed, device=device,
                                callback=callback)
    train_s = time.perf_counter() - t0

    def scores(df: pd.DataFrame, perturb=None) -> np.ndarray:
        return score_frame(det, store.eval(df, perturb), store.start, len(df), device=device)

    val_df = pd.concat(list(val_parts.values()), ignore_index=True)
    threshold = E.fit_threshold(scores(val_df), _labels(val_df))
    seen = {t: E.generator_metrics(scores(df), _labels(df), threshold) for t, df in val_parts.items()}
    pert = perturbations(cfg.jpeg_qualities, cfg.blur_sigmas, cfg.scale_factors)

    def evaluate(parts: dict[str, pd.DataFrame]) -> tuple[dict, pd.DataFrame]:
        per, tables = {}, []
        for t, df in parts.items():
            s = scores(df)
            per[t] = E.generator_metrics(s, _labels(df), threshold)
            tables.append(pd.DataFrame({"task": t, "path": df["path"], "label": _labels(df), "score": s}))

        def pmap(name: str) -> float | None:
            return E.mean_of({t: {"ap": E.generator_metrics(scores(df, (name, pert[name])), _labels(df),
                                                            threshold)["ap"]} for t, df in parts.items()}, "ap")

        robust = {"blur": {f"{float(s):g}": pmap(f"blur{float(s):g}") for s in cfg.blur_sigmas},
                  "jpeg": {str(int(q)): pmap(f"jpeg{int(q)}") for q in cfg.jpeg_qualities}}
        if cfg.scale_factors:
            robust["scale"] = {f"{float(f):g}": pmap(f"scale{float(f):g}") for f in cfg.scale_factors}
        res = {"map": E.mean_of(per, "ap"), "mean_acc": E.mean_of(per, "acc"), "per_generator": per,
               "robustness": robust}
        return res, pd.concat(tables, ignore_index=True)

    main, table = evaluate(eval_parts)
    tables = [table.assign(set="main")]
    extra = {}
    for name, parts in extra_parts.items():
        extra[name], t = evaluate(parts)
        extra[name]["eval_tasks"] = list(parts)
        tables.append(t.assign(set=name))
    metrics = {**main, "seen": seen, "extra": extra, "history": history, "train_seconds": train_s,
               "trunk_seconds": trunk_s}
    return det, threshold, metrics, pd.concat(tables, ignore_index=True)
