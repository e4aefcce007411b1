"""The real/fake verdict: one calibrated fake probability and one stored threshold for every consumer.

The class head answers "which of 2T classes"; its argmax makes a poor real/fake decision, because the T "real"
classes split the real probability between them while each fake class keeps its own. The verdict is a separate
binary head on the same super-feature (``continual.verdict: binary``):

* a class-balanced logistic regression (L2, scikit-learn's ``C``; the standardisation folded into the weights) on
  the super-features of the rows the class head is fitted on (the task's train rows + the exemplar memory), so its
  ``fake_probability`` is calibrated to equal priors of real and fake;
* ``C`` chosen among :data:`C_GRID` by the out-of-fold log-loss of a :data:`FOLDS`-fold cross-fit on those rows;
* the threshold is the one of best balanced accuracy on the out-of-fold probabilities (cross-fitted: no row is
  scored by a head fitted on it; validation images are never used).

``continual.verdict: argmax`` keeps the plain rule (real/fake = kind of the most probable class, fake probability =
the fake classes' total). Either way :func:`decide` turns (class probabilities, fake probability, threshold) into a
class: the most probable fake class when the verdict is fake, else the most probable real class. The metrics, the
prediction table, ``lorax predict``, ``lorax scan`` and the served model all call it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorax.utils.progress import bar, timed

log = logging.getLogger(__name__)

VERDICTS = ("binary", "argmax")
C_GRID = (0.01, 0.1, 1.0, 10.0)
FOLDS = 5  # of the cross-fit (fewer when a kind has fewer rows; at least 2)
WEIGHTS_FILE = "verdict.safetensors"
INFO_KEY = "verdict"


@dataclass
class Verdict:
    """A binary head ``sigmoid(features @ weight + bias)`` on the raw super-feature and its decision threshold."""

    weight: np.ndarray  # (D,) float32
    bias: float
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)

    def fake_probability(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.weight.shape[0]:
            raise ValueError(f"verdict: features of shape {f.shape} for a head of width {self.weight.shape[0]}")
        z = f @ self.weight.astype(np.float64) + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    def save(self, state_dir: str | Path) -> dict[str, Any]:
        """Write the weights next to the state's tensors; return the ``state.json`` entry."""
        import torch
        from safetensors.torch import save_file

        save_file({"weight": torch.from_numpy(np.ascontiguousarray(self.weight, dtype=np.float32)),
                   "bias": torch.tensor([self.bias], dtype=torch.float32)}, str(Path(state_dir) / WEIGHTS_FILE))
        return {"kind": "binary", "threshold": float(self.threshold), **self.info}

    @classmethod
    def load(cls, state_dir: str | Path, entry: dict[str, Any] | None) -> Verdict | None:
        """The verdict saved in ``state_dir`` (None for states without one: they decide by argmax)."""
        path = Path(state_dir) / WEIGHTS_FILE
        if not entry or entry.get("kind") != "binary" or not path.is_file():
            return None
        from safetensors.torch import load_file

        t = load_file(str(path))
        info = {k: v for k, v in entry.items() if k not in ("kind", "threshold")}
        return cls(t["weight"].numpy().astype(np.float32), float(t["bias"].item()), float(entry["threshold"]), info)


def fit_binary_logistic(z: np.ndarray, y: np.ndarray, C: float, max_iter: int = 200) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic regression on standardised ``z``: min C * sum_i w_i * BCE_i + |W|^2 / 2, with
    ``w_i`` = n / (2 n_class(i)) (equal total weight per class; the bias is not penalised). L-BFGS, float64, in
    the row space of ``z`` when it is wider than tall (:func:`lorax.utils.linalg.row_space`: same solution)."""
    return _fit_all(z, y, (C,), max_iter)[0]


def _fit_all(z: np.ndarray, y: np.ndarray, cs: tuple[float, ...], max_iter: int = 200
             ) -> list[tuple[np.ndarray, float]]:
    """:func:`fit_binary_logistic` for each C in ``cs``; the row-space reduction is computed once for all."""
    import torch

    from lorax.utils.linalg import row_space

    x = torch.from_numpy(np.asarray(z, dtype=np.float64))
    t = torch.from_numpy(np.asarray(y, dtype=np.float64))
    n = len(t)
    n_fake = float(t.sum())
    n_real = n - n_fake
    if n_fake == 0 or n_real == 0:
        raise ValueError("verdict: the rows it is fitted on need real and fake images (the task's train split and "
                         "the exemplar memory have only one kind)")
    basis = row_space(x)  # wider than tall: the same fits in the row space, mapped back
    if basis is not None:
        r, v = basis
        return [((v @ torch.from_numpy(beta)).numpy(), b) for beta, b in _fit_all(r.numpy(), y, cs, max_iter)]
    sw = torch.where(t > 0, n / (2 * n_fake), n / (2 * n_real))
    out = []
    for C in cs:
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                                history_size=20, line_search_fn="strong_wolfe")
        scale = 1.0 / (C * n)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logit = x @ w + b
            loss = (sw * torch.nn.functional.binary_cross_entropy_with_logits(logit, t, reduction="none")).mean()
            loss = loss + 0.5 * scale * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        out.append((w.detach().numpy(), float(b.detach().item())))
    return out


def _fit_raw(x: np.ndarray, y: np.ndarray, cs: tuple[float, ...]) -> list[tuple[np.ndarray, float]]:
    """Fit on standardised ``x`` for each C in ``cs`` (one standardisation, one reduction), return weights on the
    raw features (standardisation folded in)."""
    mean = x.mean(0)
    std = np.maximum(x.std(0), 1e-6)
    out = []
    for w, b in _fit_all((x - mean) / std, y, cs):
        w_raw = w / std
        out.append((w_raw, float(b - w_raw @ mean)))
    return out


def _folds(y: np.ndarray, groups: np.ndarray | None, k: int) -> np.ndarray:
    """Deterministic fold of every row: groups (when given) never split; otherwise stratified by label."""
    fold = np.zeros(len(y), dtype=np.int64)
    if groups is not None:
        uniq, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        order = np.random.default_rng(0).permutation(len(uniq))
        return order[inv] % k
    for lab in (0, 1):
        idx = np.flatnonzero(y == lab)
        fold[idx] = np.random.default_rng(lab).permutation(len(idx)) % k
    return fold


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Class-balanced log-loss (each class weighs half)."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-0.5 * (np.log(p[y == 1]).mean() + np.log(1 - p[y == 0]).mean()))


def fit_verdict(features: np.ndarray, is_fake: np.ndarray, groups: np.ndarray | None = None,
                c_grid: tuple[float, ...] = C_GRID) -> Verdict:
    """Fit the binary head on ``features`` (N, D) and its threshold on out-of-fold probabilities (see module doc)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(is_fake).astype(np.int64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"verdict: {len(y)} labels for features of shape {x.shape}")
    n_min = int(min((y == 0).sum(), (y == 1).sum()))
    if n_min == 0:
        fit_binary_logistic(x[:1], y[:1], 1.0)  # raises the one-line error
    k = max(2, min(FOLDS, n_min))
    with timed(log, f"verdict fit: C in {list(c_grid)} by a {k}-fold cross-fit on {len(y)} rows x {x.shape[1]} "
                    "features, then the final fit"):
        return _cross_fit(x, y, _folds(y, groups, k), k, c_grid)


def _cross_fit(x: np.ndarray, y: np.ndarray, fold: np.ndarray, k: int, c_grid: tuple[float, ...]) -> Verdict:
    """The out-of-fold probabilities of every C (one INFO line per fold: the fits take minutes on real images),
    the chosen C and threshold, and the head refit on all rows."""
    oof = {c: np.zeros(len(y)) for c in c_grid}
    t0 = time.perf_counter()
    for f in bar(range(k), desc="verdict cross-fit", unit="fold"):
        test, train = fold == f, fold != f
        if not test.any() or len(np.unique(y[train])) < 2:
            continue
        for c, (w, b) in zip(c_grid, _fit_raw(x[train], y[train], c_grid), strict=True):
            oof[c][test] = 1.0 / (1.0 + np.exp(-np.clip(x[test] @ w + b, -60, 60)))
        log.info("verdict fit: fold %d/%d (%d C values) after %.1f s", f + 1, k, len(c_grid), time.perf_counter() - t0)
    losses = {c: _log_loss(oof[c], y) for c in c_grid}
    best = min(c_grid, key=lambda c: (losses[c], c))
    from lorax.utils.binary import fit_threshold

    threshold = fit_threshold(oof[best], y, balanced=True)
    p = oof[best]
    real_ok, fake_ok = float((p[y == 0] < threshold).mean()), float((p[y == 1] >= threshold).mean())
    ((w, b),) = _fit_raw(x, y, (best,))
    info = {"c": best, "folds": k, "rows": len(y), "oof_log_loss": {str(c): round(v, 4) for c, v in losses.items()},
            "oof_balanced_acc": round(100 * (real_ok + fake_ok) / 2, 2), "oof_real_acc": round(100 * real_ok, 2),
            "oof_fake_acc": round(100 * fake_ok, 2)}
    return Verdict(w.astype(np.float32), b, float(threshold), info)


def decide(probs: np.ndarray, fake_p: np.ndarray, threshold: float | None) -> np.ndarray:
    """The predicted class of each row: with a ``threshold``, the most probable fake class when ``fake_p >=
    threshold`` else the most probable real class; without one (``argmax`` verdict), the most probable class."""
    probs = np.asarray(probs)
    if threshold is None:
        return probs.argmax(axis=1)
    fake = np.asarray(fake_p) >= threshold
    best_fake = 2 * probs[:, 1::2].argmax(axis=1) + 1
    best_real = 2 * probs[:, 0::2].argmax(axis=1)
    return np.where(fake, best_fake, best_real)


def describe(entry: dict[str, Any] | None) -> str:
    """One line for logs: the verdict's kind, threshold and cross-fitted balanced accuracy."""
    if not entry or entry.get("kind") != "binary":
        return "verdict: argmax of the class head"
    return (f"verdict: binary head C={entry.get('c')}, threshold {entry['threshold']:.3f}, cross-fitted balanced "
            f"accuracy {entry.get('oof_balanced_acc')}% on {entry.get('rows')} training rows + memory")
