"""``run_detect``: train a real/fake detector on some generators and evaluate it on all the others.

The UnivFD / CNNSpot protocol: train on the ``train`` split of the training generators (``detect.train_tasks``),
fit the decision threshold on their ``val`` split, evaluate on the ``val`` split of every other manifest in the
folder (those images, and those generators, were never seen). Loss = BCE + ``detect.balance_weight`` x the summed
load-balancing losses of the MoLE layers; AdamW at ``detect.lr`` (other AdamW settings at torch's defaults), constant
rate, ``detect.epochs`` epochs; blur/JPEG augmentation with ``detect.aug_prob`` each, drawn afresh every epoch.
With ``detect.views >= 1`` the detector trains on that many fixed augmented views per image instead, the frozen
trunk's outputs kept in the feature store (:mod:`lorax.detect.fixed_views`).

Outputs in ``out_dir``: ``metrics.json`` (see :func:`run_detect`), ``detector.safetensors`` (adapters, routers,
head, threshold and settings), ``scores.parquet`` (every evaluated image's fake probability), ``robustness.png``.
MLflow / DVC are not touched here: the pipeline passes ``callback`` and logs what it receives.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from lorax.config import Params
from lorax.data.dataset import make_loader
from lorax.data.manifest import read_manifest
from lorax.detect import evaluate as E
from lorax.detect.augment import BlurJpeg, augment_batch
from lorax.detect.detector import Detector, build_detector, save_detector
from lorax.features import open_store
from lorax.features.store import FeatureStore
from lorax.registry import DETECTORS
from lorax.utils.io import write_text

__all__ = ["EpochCallback", "detect_params", "evaluate_sets", "list_manifests", "run_detect", "train_detector"]

from lorax.continual.batches import resolve_device  # noqa: E402  (one device policy for every trainer)

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


def list_manifests(manifests_dir: str | Path) -> dict[str, Path]:
    """``{task: path}`` of every ``*.parquet`` manifest in the folder, sorted by name."""
    d = Path(manifests_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: manifest folder not found; run `lorax data prepare` (or `dvc repro`) first")
    found = {p.stem: p for p in sorted(d.glob("*.parquet"))}
    if not found:
        raise FileNotFoundError(f"{d}: no *.parquet manifests; run `lorax data prepare` (or `dvc repro`) first")
    return found


def _split(df: pd.DataFrame, split: str, task: str, path: Path) -> pd.DataFrame:
    part = df[df["split"] == split].reset_index(drop=True)
    if part.empty:
        raise ValueError(f"{path}: task {task!r} has no {split!r} images; the detector needs both train and val "
                         "splits of the training generators and the val split of the others")
    return part


def _labels(df: pd.DataFrame) -> np.ndarray:
    return (df["class_id"].to_numpy() % 2).astype(int)


def _clean(o: Any) -> Any:
    """NaN -> None, numpy scalars -> Python, for strict JSON."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _key(v: float) -> str:
    return f"{float(v):g}"


def train_detector(
    det: Detector,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    params: Params,
    device: torch.device,
    callback: EpochCallback | None = None,
) -> list[dict[str, float]]:
    """Train ``det`` in place; returns one dict of epoch figures per epoch (also passed to ``callback``)."""
    cfg, seed = params.detect, params.seed
    info = det.backbone.info
    opt = torch.optim.AdamW(det.trainable_parameters(), lr=cfg.lr)
    aug = BlurJpeg(prob=cfg.aug_prob)
    amp = params.train.amp and device.type == "cuda"
    history = []
    for epoch in range(cfg.epochs):
        det.train()
        loader = make_loader(train_df, train=True, crop=params.model.img_size, mean=info.mean, std=info.std,
                             batch_size=cfg.batch_size, num_workers=params.train.num_workers, seed=seed + epoch,
                             follow_links=params.data.follow_links)
        rng = np.random.default_rng([seed, epoch])
        sums = {"loss": 0.0, "bce": 0.0, "balance": 0.0}
        counts = {n: torch.zeros(layer.num_experts, dtype=torch.long) for n, layer in det.mole.items()
                  if layer.num_experts}
        n_seen, t0 = 0, time.perf_counter()
        for x, cls, _ in loader:
            x = augment_batch(x, info.mean, info.std, aug, rng).to(device, non_blocking=True)
            y = (cls % 2).float().to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
                logits = det(x)
            bce = F.binary_cross_entropy_with_logits(logits.float(), y)
            bal = det.balance_loss().float()
            loss = bce + cfg.balance_weight * bal
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detector training diverged at epoch {epoch + 1} (loss {loss.item()}); "
                                         "lower detect.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = len(y)
            n_seen += b
            for k, v in (("loss", loss), ("bce", bce), ("balance", bal)):
                sums[k] += float(v.detach()) * b
            for n, c in counts.items():
                c += det.mole[n].last_counts.cpu()
        logs = {k: v / max(n_seen, 1) for k, v in sums.items()}
        if counts:  # router health: mean over layers of the busiest expert's share of tokens (1/N = perfectly even)
            logs["expert_max_share"] = float(np.mean([(c.max() / c.sum().clamp(min=1)).item()
                                                      for c in counts.values()]))
        scores = E.predict_scores(det, val_df, params.model.img_size, info.mean, info.std, params.eval.batch_size,
                                  device, num_workers=params.train.num_workers, autocast=amp,
                                  follow_links=params.data.follow_links)
        m = E.generator_metrics(scores, _labels(val_df), 0.5)
        logs.update({"val_ap": m["ap"] if m["ap"] is not None else float("nan"), "val_acc@0.5": m["acc"],
                     "epoch_seconds": time.perf_counter() - t0})
        log.info("detect epoch %d/%d: %s", epoch + 1, cfg.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))
        history.append(logs)
        if callback is not None:
            callback(epoch, logs)
    return history


def evaluate_sets(
    det: Detector,
    parts: Mapping[str, pd.DataFrame],
    threshold: float,
    params: Params,
    device: torch.device,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score each generator's rows: ``{map, mean_acc, per_generator, robustness}`` and a per-image score table.

    Robustness: every image of every generator is blurred (``detect.blur_sigmas``) or JPEG-compressed
    (``detect.jpeg_qualities``) before scoring; each setting's entry is the mAP over the generators.
    """
    cfg, info = params.detect, det.backbone.info
    amp = params.train.amp and device.type == "cuda"

    def scores_of(df: pd.DataFrame, perturb: E.Perturb | None = None) -> np.ndarray:
        return E.predict_scores(det, df, params.model.img_size, info.mean, info.std, params.eval.batch_size, device,
                                perturb=perturb, num_workers=params.train.num_workers, autocast=amp,
                                follow_links=params.data.follow_links)

    per_generator, tables = {}, []
    for t, df in parts.items():
        s = scores_of(df)
        per_generator[t] = E.generator_metrics(s, _labels(df), threshold)
        tables.append(pd.DataFrame({"task": t, "path": df["path"], "label": _labels(df), "score": s}))

    def perturbed_map(fn: E.Perturb) -> float | None:
        aps = {t: {"ap": E.generator_metrics(scores_of(df, fn), _labels(df), threshold)["ap"]}
               for t, df in parts.items()}
        return E.mean_of(aps, "ap")

    result = {
        "map": E.mean_of(per_generator, "ap"),
        "mean_acc": E.mean_of(per_generator, "acc"),
        "per_generator": per_generator,
        "robustness": {
            "blur": {_key(s): perturbed_map(E.blur_fn(s)) for s in cfg.blur_sigmas},
            "jpeg": {str(int(q)): perturbed_map(E.jpeg_fn(q)) for q in cfg.jpeg_qualities},
        },
    }
    return result, pd.concat(tables, ignore_index=True)


def detect_params(params: Params) -> Params:
    """``params`` with the detector's own backbone (``detect.model``, when set) as the model section."""
    if params.detect.model is None:
        return params
    return params.model_copy(update={"model": params.detect.model})


def run_detect(
    params: Params,
    manifests_dir: str | Path,
    out_dir: str | Path,
    method: str | None = None,
    train_tasks: list[str] | None = None,
    callback: EpochCallback | None = None,
    extra_eval: Mapping[str, str | Path] | None = None,
    store: FeatureStore | None = None,
) -> dict[str, Any]:
    """Train on ``train_tasks`` (default ``detect.train_tasks``) with ``method`` (default ``detect.method``),
    evaluate on every other manifest in ``manifests_dir``, write the outputs to ``out_dir``; returns the metrics.
    The backbone is ``detect.model`` when set (the detector's own, e.g. a pretrained DINOv2), else ``model``.
    ``detect.views >= 1``: fixed views, their trunk outputs in ``store`` (default: ``open_store(params.cache)``).

    Metrics: ``map``, ``mean_acc`` (over the evaluated generators, percent), ``per_generator`` {name: {ap, acc,
    real_acc, fake_acc, n_real, n_fake}}, ``threshold`` (on the fake probability), ``robustness`` {blur: {sigma:
    mAP}, jpeg: {quality: mAP}}, ``seen`` (same figures on the training generators' val split), ``method``,
    ``train_tasks``, ``eval_tasks``, ``trainable_params``, ``backbone_params``, ``history`` (per epoch),
    ``train_seconds``, ``extra`` {name: {map, mean_acc, per_generator, robustness, eval_tasks}} for each folder in
    ``extra_eval`` (test-only sets such as ``../shared/data/realworld`` prepared as manifests: every image of every
    manifest there is scored, with the same threshold; nothing is fitted on them).
    """
    params = detect_params(params)
    cfg = params.detect
    method = method or cfg.method
    train_tasks = list(train_tasks or cfg.train_tasks)
    if method not in DETECTORS:
        raise ValueError(f"detect.method: unknown detector {method!r}; allowed: {DETECTORS.names()}")
    manifests = list_manifests(manifests_dir)
    missing = [t for t in train_tasks if t not in manifests]
    if missing:
        raise FileNotFoundError(f"{manifests_dir}: no manifest for training generator(s) {missing} (detect.train_tasks"
                                f" / --train-tasks); found: {sorted(manifests)}")
    eval_tasks = [t for t in manifests if t not in train_tasks]
    if not eval_tasks:
        raise ValueError(f"{manifests_dir}: every manifest is a training generator {train_tasks}; nothing unseen "
                         "is left to evaluate on")
    extra_dirs = {name: list_manifests(folder) for name, folder in (extra_eval or {}).items()}  # fail early
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = {t: read_manifest(p) for t, p in manifests.items()}
    train_df = pd.concat([_split(frames[t], "train", t, manifests[t]) for t in train_tasks], ignore_index=True)
    val_parts = {t: _split(frames[t], "val", t, manifests[t]) for t in train_tasks}
    val_df = pd.concat(list(val_parts.values()), ignore_index=True)
    eval_parts = {t: _split(frames[t], "val", t, manifests[t]) for t in eval_tasks}

    device = resolve_device(params.train.device)
    if cfg.views >= 1:
        store = store if store is not None else open_store(params.cache)
        return _run_fixed_views(params, store, method, train_tasks, eval_tasks, train_df, val_parts, eval_parts,
                                extra_dirs, out, device, callback)
    det = build_detector(params.model, cfg.model_copy(update={"method": method}), method, seed=params.seed).to(device)
    n_train = sum(p.numel() for p in det.trainable_parameters())
    n_backbone = sum(p.numel() for p in det.backbone.parameters() if not p.requires_grad)
    log.info("detector %s on %s: %d trainable parameters (%.3f%% of the %d-parameter backbone); train %s (%d "
             "images), evaluate %s", method, params.model.backbone, n_train, 100 * n_train / max(n_backbone, 1),
             n_backbone, train_tasks, len(train_df), eval_tasks)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(params.seed)
        history = train_detector(det, train_df, val_df, params, device, callback)
    train_seconds = time.perf_counter() - t0

    info = det.backbone.info
    val_scores = E.predict_scores(det, val_df, params.model.img_size, info.mean, info.std, params.eval.batch_size,
                                  device, num_workers=params.train.num_workers,
                                  autocast=params.train.amp and device.type == "cuda",
                                  follow_links=params.data.follow_links)
    threshold = E.fit_threshold(val_scores, _labels(val_df))
    offsets = np.cumsum([0] + [len(v) for v in val_parts.values()])
    seen = {t: E.generator_metrics(val_scores[a:b], _labels(val_parts[t]), threshold)
            for t, a, b in zip(val_parts, offsets[:-1], offsets[1:], strict=True)}
    main, main_scores = evaluate_sets(det, eval_parts, threshold, params, device)
    score_tables = [main_scores.assign(set="main")]
    extra = {}
    for name, found in extra_dirs.items():
        parts = {t: read_manifest(p) for t, p in found.items()}
        extra[name], table = evaluate_sets(det, parts, threshold, params, device)
        extra[name]["eval_tasks"] = list(parts)
        score_tables.append(table.assign(set=name))
    metrics = {
        "method": method,
        "backbone": params.model.backbone,
        "train_tasks": train_tasks,
        "eval_tasks": eval_tasks,
        "map": main["map"],
        "mean_acc": main["mean_acc"],
        "threshold": threshold,
        "per_generator": main["per_generator"],
        "seen": seen,
        "robustness": main["robustness"],
        "extra": extra,
        "trainable_params": n_train,
        "backbone_params": n_backbone,
        "train_seconds": train_seconds,
        "history": history,
    }
    metrics = _clean(metrics)
    save_detector(det, out / "detector.safetensors", params.model, cfg.model_copy(update={"method": method}),
                  threshold, extra={"train_tasks": train_tasks, "seed": params.seed})
    pd.concat(score_tables, ignore_index=True).to_parquet(out / "scores.parquet", index=False)
    E.plot_robustness(metrics["robustness"], metrics["map"], out / "robustness.png",
                      title=f"{method} on {params.model.backbone}, trained on {'+'.join(train_tasks)}")
    write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")  # strict JSON: no NaN
    log.info("detect %s: mAP %s, mean acc %s over %d unseen generators; threshold %.4f; %s", method,
             _fmt(metrics["map"]), _fmt(metrics["mean_acc"]), len(eval_tasks), threshold, out / "metrics.json")
    return metrics


def _run_fixed_views(params: Params, store: FeatureStore, method: str, train_tasks: list[str],
                     eval_tasks: list[str], train_df: pd.DataFrame, val_parts: dict[str, pd.DataFrame],
                     eval_parts: dict[str, pd.DataFrame], extra_dirs: Mapping[str, dict[str, Path]], out: Path,
                     device: torch.device, callback: EpochCallback | None) -> dict[str, Any]:
    """:func:`run_detect` on fixed views (``detect.views >= 1``): same outputs and metric keys."""
    from lorax.detect.fixed_views import run_fixed_views

    cfg = params.detect
    extra_parts = {name: {t: read_manifest(p) for t, p in found.items()} for name, found in extra_dirs.items()}
    det, threshold, m, scores = run_fixed_views(params, store, train_df, val_parts, eval_parts, extra_parts, method,
                                                device, callback)
    n_train = sum(p.numel() for p in det.trainable_parameters())
    n_backbone = sum(p.numel() for p in det.backbone.parameters() if not p.requires_grad)
    metrics = _clean({"method": method, "backbone": params.model.backbone, "train_tasks": train_tasks,
                      "eval_tasks": eval_tasks, "threshold": threshold, "trainable_params": n_train,
                      "backbone_params": n_backbone, **m})
    save_detector(det, out / "detector.safetensors", params.model, cfg.model_copy(update={"method": method}),
                  threshold, extra={"train_tasks": train_tasks, "seed": params.seed})
    scores.to_parquet(out / "scores.parquet", index=False)
    E.plot_robustness(metrics["robustness"], metrics["map"], out / "robustness.png",
                      title=f"{method} on {params.model.backbone}, trained on {'+'.join(train_tasks)}")
    write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    log.info("detect %s (%d fixed views): mAP %s, mean acc %s over %d unseen generators; threshold %.4f; %s", method,
             cfg.views, _fmt(metrics["map"]), _fmt(metrics["mean_acc"]), len(eval_tasks), threshold,
             out / "metrics.json")
    return metrics


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
