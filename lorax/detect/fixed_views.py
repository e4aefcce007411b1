"""Training and scoring a detector on fixed views (``detect.views >= 1``), the trunk's outputs from the feature store.

Each training image has ``detect.views`` fixed augmented views and each scored image its fixed evaluation crops
(:mod:`lorax.detect.trunk_features`); the frozen trunk's outputs of every view are kept in the feature store
(:mod:`lorax.features.store`), so every method of a comparison, every fold of a cross-validation and a re-run read
the same tensors, and an epoch runs only the adapted blocks. :func:`fit_detector` trains one method on the
training views (head from the probe's logistic regression, then the adapters and the head); :func:`score_frame`
scores a manifest frame, clean or perturbed; :func:`run_fixed_views` is :func:`lorax.detect.runner.run_detect`'s
training and scoring on this path.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from lorax.config import Params
from lorax.detect import evaluate as E
from lorax.detect.config import DetectConfig
from lorax.detect.detector import Detector, build_detector
from lorax.detect.trunk import CachedSet, fit_probe_head, predict_cached, train_cached
from lorax.detect.trunk_features import TrunkFeatures
from lorax.features.store import FeatureStore
from lorax.models.config import ModelConfig

__all__ = ["fit_detector", "run_fixed_views", "score_frame"]


def fit_detector(model_cfg: ModelConfig, cfg: DetectConfig, method: str, train: CachedSet, start: int, seed: int,
                 device: torch.device | str = "cpu", probe_c: float | None = None,
                 callback: Callable[[int, dict[str, float]], None] | None = None
                 ) -> tuple[Detector, list[dict[str, float]]]:
    """A detector of ``method`` trained on the fixed views ``train``: the head starts as the probe (logistic
    regression with C = ``probe_c`` or ``detect.probe_c`` on the standardised frozen features; ``detect.head_init:
    zero``: at zero, standardisation kept); every method but the probe then trains its adapters and head for
    ``detect.epochs``."""
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
    """Fake probability of every row of the frame ``cached`` was read for (``n_rows`` rows)."""
    s = predict_cached(det, cached, start, device=device)
    if len(s) != n_rows:
        raise ValueError(f"the crops cover {len(s)} rows, the frame has {n_rows}")
    return s


def _labels(df: pd.DataFrame) -> np.ndarray:
    return (df["class_id"].to_numpy() % 2).astype(int)


def run_fixed_views(params: Params, store: FeatureStore, train_df: pd.DataFrame, val_parts: dict[str, pd.DataFrame],
                    eval_parts: dict[str, pd.DataFrame], extra_parts: dict[str, dict[str, pd.DataFrame]],
                    method: str, device: torch.device,
                    callback: Callable[[int, dict[str, float]], None] | None = None
                    ) -> tuple[Detector, float, dict, pd.DataFrame]:
    """:func:`lorax.detect.runner.run_detect`'s training and scoring on fixed views (``detect.views >= 1``), the
    trunk's outputs read from (or computed into) ``store``.

    Returns the detector, the threshold (fitted on the training generators' val split), the metrics that depend on
    the path (``per_generator``, ``map``, ``mean_acc``, ``seen``, ``robustness`` {blur, jpeg, scale}, ``extra``,
    ``history``, ``train_seconds``, ``trunk_seconds``) and the per-image score table.
    """
    cfg, model_cfg = params.detect, params.model
    if cfg.views < 1:
        raise ValueError("detect.views: the fixed-view path needs at least one view per training image")
    trunk = TrunkFeatures(store, model_cfg, cfg, device=device, batch_size=params.eval.batch_size,
                          follow_links=params.data.follow_links, num_workers=params.train.num_workers)
    t0 = time.perf_counter()
    views = trunk.train(train_df, params.seed)
    trunk_s = time.perf_counter() - t0
    det, history = fit_detector(model_cfg, cfg, method, views, trunk.start, params.seed, device=device,
                                callback=callback)
    train_s = time.perf_counter() - t0

    def scores(df: pd.DataFrame, perturb: str | None = None) -> np.ndarray:
        return score_frame(det, trunk.eval(df, perturb), trunk.start, len(df), device=device)

    val_df = pd.concat(list(val_parts.values()), ignore_index=True)
    threshold = E.fit_threshold(scores(val_df), _labels(val_df))
    seen = {t: E.generator_metrics(scores(df), _labels(df), threshold) for t, df in val_parts.items()}

    def evaluate(parts: dict[str, pd.DataFrame]) -> tuple[dict, pd.DataFrame]:
        per, tables = {}, []
        for t, df in parts.items():
            s = scores(df)
            per[t] = E.generator_metrics(s, _labels(df), threshold)
            tables.append(pd.DataFrame({"task": t, "path": df["path"], "label": _labels(df), "score": s}))

        def pmap(name: str) -> float | None:
            return E.mean_of({t: {"ap": E.generator_metrics(scores(df, name), _labels(df), threshold)["ap"]}
                              for t, df in parts.items()}, "ap")

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
