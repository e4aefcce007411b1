"""Figures of a continual run: accuracy matrix heatmap, per-task curves, confusion matrix (PNG, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_accuracy_matrix", "plot_confusion", "plot_task_curves"]


def _names(names: Sequence[str] | None, n: int, what: str) -> list[str]:
    if names is None:
        return [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{what}: {len(names)} names for {n} rows/columns")
    return [str(s) for s in names]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _square(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty square matrix, got shape {a.shape}")
    return a


def plot_accuracy_matrix(R: np.ndarray, task_names: Sequence[str] | None, path: str | Path) -> Path:
    """Heatmap of R[i, j] (accuracy on task i after training task j, %) with the value in each cell."""
    R = _square(R, "accuracy matrix")
    names = _names(task_names, R.shape[0], "plot_accuracy_matrix")
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.6 * n))
    im = ax.imshow(np.ma.masked_invalid(R), cmap="viridis", vmin=0, vmax=100)
    for i in range(n):
        for j in range(n):
            if np.isfinite(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if R[i, j] > 60 else "white")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("after training task")
    ax.set_ylabel("evaluated task")
    ax.set_title("accuracy matrix (multi-real, %)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_task_curves(R: np.ndarray, task_names: Sequence[str] | None, path: str | Path) -> Path:
    """One line per task: its accuracy from the step it was learned to the last step (forgetting shows as a drop)."""
    R = _square(R, "accuracy matrix")
    names = _names(task_names, R.shape[0], "plot_task_curves")
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * n + 2), 3.5))
    for i in range(n):
        steps = np.arange(i, n)
        ax.plot(steps, R[i, i:], marker="o", markersize=3, label=names[i])
    ax.plot(np.arange(n), [np.nanmean(R[: j + 1, j]) for j in range(n)], "k--", lw=2, label="mean")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_xlabel("after training task")
    ax.set_ylabel("accuracy (%)")
    low = np.nanmin(R) if np.isfinite(R).any() else 0.0
    ax.set_ylim(max(0.0, 10 * np.floor((low - 5) / 10)), 101)  # zoom so forgetting is visible
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, class_names: Sequence[str] | None, path: str | Path) -> Path:
    """Confusion matrix (rows = true class, columns = predicted), coloured by row share, counts in cells."""
    cm = _square(cm, "confusion matrix")
    names = _names(class_names, cm.shape[0], "plot_confusion")
    n = len(names)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.45 * n))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of row")
    return _save(fig, path)
