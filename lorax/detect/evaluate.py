"""Detector scoring: fake probabilities, the fitted threshold, per-generator AP/accuracy, robustness curves, plots
and tables.

Conventions (UnivFD / CLIP-MoLE): fake is the positive class; AP and accuracies are percentages (0..100). The
decision threshold is fitted once, on the validation split of the *training* generators, by maximising accuracy
there; it is then used unchanged on every other generator. ``acc`` is the accuracy over all of a generator's
evaluated images, ``real_acc``/``fake_acc`` over its real / fake ones (None when it has none; AP is then None too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score

from lorax.data.dataset import make_loader
from lorax.utils.binary import fit_threshold
from lorax.detect.augment import gaussian_blur, jpeg, perturb_batch

__all__ = [
    "blur_fn",
    "fit_threshold",
    "generator_metrics",
    "jpeg_fn",
    "mean_of",
    "per_generator_table",
    "plot_robustness",
    "predict_scores",
    "robustness_table",
]

Perturb = Callable[[np.ndarray], np.ndarray]


@torch.no_grad()
def predict_scores(
    det: torch.nn.Module,
    df: pd.DataFrame,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: torch.device,
    perturb: Perturb | None = None,
    num_workers: int = 0,
    autocast: bool = False,
    follow_links: bool = False,
) -> np.ndarray:
    """Fake probability of every row of ``df`` (centre crop), in manifest order; ``perturb`` acts on the uint8 crop.
    ``follow_links``: ``data.follow_links`` (rows are checked by the loader's dataset)."""
    det.eval()
    loader = make_loader(df, train=False, crop=crop, mean=mean, std=std, batch_size=batch_size,
                         num_workers=num_workers, follow_links=follow_links)
    out = np.empty(len(df), dtype=np.float64)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast and device.type == "cuda" else nullcontext()
    for x, _, rows in loader:
        if perturb is not None:
            x = perturb_batch(x, mean, std, perturb)
        with ctx:
            logits = det(x.to(device, non_blocking=True))
        out[rows.numpy()] = torch.sigmoid(logits.float()).cpu().numpy()
    return out


def _percent(x: np.ndarray) -> float | None:
    return float(100.0 * x.mean()) if x.size else None


def generator_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | None]:
    """``{ap, acc, real_acc, fake_acc, n_real, n_fake}`` of one generator at ``threshold`` (percent)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    if scores.size == 0:
        raise ValueError("generator_metrics: no images to score; every evaluated generator needs validation images")
    pred = scores >= threshold
    real, fake = labels == 0, labels == 1
    ap = float(100.0 * average_precision_score(labels, scores)) if real.any() and fake.any() else None
    return {
        "ap": ap,
        "acc": _percent(pred == fake),
        "real_acc": _percent(~pred[real]),
        "fake_acc": _percent(pred[fake]),
        "n_real": int(real.sum()),
        "n_fake": int(fake.sum()),
    }


def mean_of(per_generator: Mapping[str, Mapping[str, float | None]], key: str) -> float | None:
    """Mean of ``key`` over generators where it is defined (None if it is defined nowhere)."""
    vals = [v[key] for v in per_generator.values() if v.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def blur_fn(sigma: float) -> Perturb:
    return lambda img: gaussian_blur(img, float(sigma))


def jpeg_fn(quality: int) -> Perturb:
    return lambda img: jpeg(img, int(quality))


def plot_robustness(robustness: Mapping[str, Mapping[str, float | None]], clean_map: float | None,
                    path: str | Path, title: str = "") -> Path:
    """Two panels, mAP vs blur sigma and vs JPEG quality (quality decreasing left to right, as in the paper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, kind, xlabel, rev in ((axes[0], "blur", "Gaussian blur sigma", False),
                                  (axes[1], "jpeg", "JPEG quality", True)):
        curve = robustness.get(kind, {})
        xs = [float(k) for k in curve]
        ys = [np.nan if v is None else v for v in curve.values()]
        if clean_map is not None:
            ax.axhline(clean_map, color="grey", ls="--", lw=1, label="no perturbation")
        ax.plot(xs, ys, "o-", label="mAP")
        ax.set_xlabel(xlabel)
        if rev:
            ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mAP (%)")
    axes[0].legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def robustness_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Long table ``perturbation, level, map`` (level 0 = clean), for DVC plots and the MLflow table view."""
    rows = [{"perturbation": "none", "level": 0.0, "map": metrics.get("map")}]
    for kind, curve in (metrics.get("robustness") or {}).items():
        rows += [{"perturbation": kind, "level": float(k), "map": v} for k, v in curve.items()]
    return pd.DataFrame(rows)


def per_generator_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One row per generator and set (``unseen``, ``seen``, each test-only set) with its figures."""
    rows = [{"generator": g, "set": "unseen", **m} for g, m in (metrics.get("per_generator") or {}).items()]
    rows += [{"generator": g, "set": "seen", **m} for g, m in (metrics.get("seen") or {}).items()]
    for name, res in (metrics.get("extra") or {}).items():
        rows += [{"generator": g, "set": name, **m} for g, m in (res.get("per_generator") or {}).items()]
    return pd.DataFrame(rows)
