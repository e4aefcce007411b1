"""Prediction sets: every answer carries the labels it cannot rule out at a configured coverage
(``continual.set_coverage``, default 0.90; null or 0: off).

Label space: the T generators (a fake image's label is its task) and ``real`` (a real photo's label, whichever of
the T real classes it sits in: the multi-real rule). A label's score is read from the class probabilities: generator
g -> p(fake class of g); real -> the sum of the real classes' probabilities (:func:`label_scores`).

Calibration (:func:`lorax.continual.head.fit_sets`, beside the head refit it cross-fits): class-conditional
(Mondrian) split-conformal on OUT-OF-FOLD probabilities of the rows the head is fitted
on (the task's train rows + the exemplar memory; validation images are never used):

* the rows are split into :data:`FOLDS` grouped folds (:func:`lorax.data.groups.row_groups`, as the verdict does:
  crops of one photo, one prompt's images never straddle folds); each fold is scored by a head fitted on the
  others, of the kind the model answers with (``continual.head: refit`` -> the same logistic refit, ``ncm`` -> the
  class means). A trained head (``continual.head: linear``) has no honest out-of-fold version (its probabilities on
  its own training rows are optimistic), so its sets are scored by a logistic refit on the same rows, cross-fitted
  the same way and stored with the sets (:attr:`PredictionSets.score_weight`): the set model, for sets only;
* the non-conformity of a row is ``1 - score(its true label)``; label y's threshold is the ``ceil((n_y+1)(1-a))``-th
  smallest of its n_y rows' non-conformities (the finite-sample correction, ``a = 1 - coverage``); a label with
  fewer than :func:`min_rows` rows falls back to the pooled quantile of all rows (``info["pooled_labels"]``);
* which rows calibrate (``info["calibration"]``): an OLD task's classes have only memory rows, and the memory's
  selected rows (herding: the most typical images) score more confidently than a test image, so their labels would
  be under-covered. When the memory holds calibration exemplars (``continual.calibration_share``: a random share of
  each class's slots, ``calib = True``, :mod:`lorax.continual.memory`), the thresholds are computed on the current
  task's train rows + the calibration exemplars only; the selected memory rows are still scored (they fit the
  out-of-fold heads) but calibrate nothing. The ``real`` label is treated the same way: the current task's real
  train rows + the old real classes' calibration exemplars. A label left with fewer than :func:`min_rows` such rows
  takes the widest threshold (the pooled one or any label's own, whichever is larger): conservative, since its
  exchangeable rows are too few to say how its scores look (``info["fallback_rule"]``: the rule;
  ``info["pooled_labels"]``: the labels it was applied to). A memory without calibration exemplars (share 0, or
  a table saved before the column) calibrates on all rows, as before;
* an answer's set holds every label whose score is at least ``1 - threshold``, most probable first.

Consistency with the row (:mod:`lorax.serving.schema`): the row's own answer is always in its set (``real`` when the
verdict is real, else the named generator); adding it can only raise coverage. A real verdict beside a set that also
holds generators reads "called real, but at 90% these generators cannot be ruled out"; a fake verdict beside a set
holding ``real`` the other way round. An ``unknown`` row (open-set) names no generator, so nothing is forced into
its set: the calibrated set over the known labels, possibly empty.

The final head is fitted on all rows, the out-of-fold heads on (k-1)/k of them: the usual cross-conformal
approximation (exact for a row scored by an out-of-fold head; close, not guaranteed, for the final one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REAL = "real"  # the label of a real photo
FOLDS = 5
MIN_LABEL_ROWS = 10  # fewer rows of a label: it takes the pooled quantile
WEIGHTS_FILE = "sets.safetensors"
INFO_KEY = "sets"


def label_names(tasks: list[str]) -> list[str]:
    """The label space: the tasks (generators) in stream order, then :data:`REAL`."""
    return [*map(str, tasks), REAL]


def label_scores(probs: np.ndarray) -> np.ndarray:
    """(N, T+1) scores of the labels from (N, 2T) class probabilities: p(fake of g) per generator, then the real
    classes' total."""
    p = np.asarray(probs, dtype=np.float64)
    return np.concatenate([p[:, 1::2], p[:, 0::2].sum(axis=1, keepdims=True)], axis=1)


def true_labels(class_ids: np.ndarray, n_tasks: int) -> np.ndarray:
    """The label of each class id: its task for a fake class (odd), ``n_tasks`` (real) for a real one."""
    c = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    return np.where(c % 2 == 1, c // 2, n_tasks)


def min_rows(coverage: float) -> int:
    """Rows a label needs for a quantile of its own: :data:`MIN_LABEL_ROWS`, and at least enough for a finite
    corrected quantile (``ceil((n+1)(1-a)) <= n``)."""
    a = 1.0 - coverage
    return max(MIN_LABEL_ROWS, math.ceil((1.0 - a) / a))


def conformal_quantile(nonconformity: np.ndarray, coverage: float) -> float:
    """The ``ceil((n+1) * coverage)``-th smallest of ``nonconformity`` (inf when that exceeds n, incl. n = 0)."""
    s = np.sort(np.asarray(nonconformity, dtype=np.float64).reshape(-1))
    k = math.ceil((len(s) + 1) * coverage - 1e-12)
    return float(s[k - 1]) if 1 <= k <= len(s) else float("inf")


def mondrian_thresholds(scores: np.ndarray, labels: np.ndarray, coverage: float, conservative: bool = False
                        ) -> tuple[np.ndarray, dict[str, Any]]:
    """Per label, the non-conformity quantile of its rows (out-of-fold ``scores`` (N, L), true ``labels`` (N,));
    labels with fewer than :func:`min_rows` rows take the pooled one, or with ``conservative`` the widest of the
    pooled one and every other label's own (used when the rows a label lacks were dropped as not exchangeable with
    its test images: nothing says its scores look like the pool's). Returns (thresholds (L,), info)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    nonconf = 1.0 - scores[np.arange(len(labels)), labels]
    pooled = conformal_quantile(nonconf, coverage)
    need = min_rows(coverage)
    q = np.empty(scores.shape[1])
    counts, fallback = [], []
    for y in range(scores.shape[1]):
        mine = nonconf[labels == y]
        counts.append(len(mine))
        if len(mine) < need:
            fallback.append(y)
        else:
            q[y] = conformal_quantile(mine, coverage)
    own = [q[y] for y in range(scores.shape[1]) if y not in fallback]
    fill = max([pooled, *own]) if conservative else pooled
    q[fallback] = fill
    q = np.minimum(q, 1.0)  # a non-conformity is at most 1: an infinite quantile means "always in the set"
    return q, {"rows_per_label": counts, "pooled_quantile": min(pooled, 1.0), "pooled_labels": fallback,
               "min_label_rows": need,
               "fallback_rule": "widest (max of the pooled quantile and every label's own)" if conservative
               else "pooled"}


def members(scores: np.ndarray, thresholds: np.ndarray, answer: np.ndarray | None = None) -> np.ndarray:
    """(N, L) bool: label y is in a row's set when ``1 - score_y <= threshold_y``; ``answer`` (N,), the row's own
    label (-1: none) is always added."""
    s = np.asarray(scores, dtype=np.float64)
    inside = (1.0 - s) <= np.asarray(thresholds, dtype=np.float64)[None, :] + 1e-12
    if answer is not None:
        a = np.asarray(answer, dtype=np.int64)
        rows = np.flatnonzero(a >= 0)
        inside[rows, a[rows]] = True
    return inside


def named_sets(inside: np.ndarray, scores: np.ndarray, names: list[str]) -> list[list[str]]:
    """Each row's set as label names, highest score first."""
    out = []
    for row_in, row_s in zip(inside, np.asarray(scores), strict=True):
        idx = np.flatnonzero(row_in)
        out.append([names[int(k)] for k in idx[np.argsort(-row_s[idx], kind="stable")]])
    return out


def set_metrics(inside: np.ndarray, labels: np.ndarray, task_ids: np.ndarray, n_tasks: int) -> dict[str, Any]:
    """``set_coverage`` (% of rows whose true label is in their set), ``set_size`` (mean labels per set), and the
    same per task (``set_coverage_per_task``, ``set_size_per_task``) and coverage per label
    (``set_coverage_per_label``: the T generators, then real; NaN for a label without rows)."""
    inside = np.asarray(inside, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    task_ids = np.asarray(task_ids, dtype=np.int64)
    hit = inside[np.arange(len(labels)), labels]
    size = inside.sum(axis=1)

    def pct(mask: np.ndarray) -> float:
        return float(100.0 * hit[mask].mean()) if mask.any() else float("nan")

    return {
        "set_coverage": pct(np.ones(len(hit), dtype=bool)),
        "set_size": float(size.mean()) if len(size) else float("nan"),
        "set_coverage_per_task": [pct(task_ids == t) for t in range(n_tasks)],
        "set_size_per_task": [float(size[task_ids == t].mean()) if (task_ids == t).any() else float("nan")
                              for t in range(n_tasks)],
        "set_coverage_per_label": [pct(labels == y) for y in range(inside.shape[1])],
    }


@dataclass
class PredictionSets:
    """Per-label non-conformity thresholds at ``coverage``; ``score_weight`` / ``score_bias``: the set model's
    logistic head on the raw super-feature (only when the model's own head is a trained one; None: the sets read
    the model's class probabilities)."""

    coverage: float
    thresholds: np.ndarray  # (T+1,) float64, in label order (label_names)
    score_weight: np.ndarray | None = None  # (2T, D)
    score_bias: np.ndarray | None = None  # (2T,)
    info: dict[str, Any] = field(default_factory=dict)

    def scores(self, probs: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """(N, T+1) label scores of rows with class probabilities ``probs`` (and super-features ``features``,
        needed when the sets have their own score model)."""
        if self.score_weight is None:
            return label_scores(probs)
        if features is None:
            raise ValueError("prediction sets: this model's sets read the super-features; none were given")
        f = np.asarray(features, dtype=np.float64)
        z = f @ self.score_weight.astype(np.float64).T + self.score_bias.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return label_scores(e / e.sum(axis=1, keepdims=True))

    @property
    def needs_features(self) -> bool:
        return self.score_weight is not None

    def save(self, state_dir: str | Path) -> dict[str, Any]:
        """Write the thresholds (and set model) next to the state's tensors; return the ``state.json`` entry."""
        import torch
        from safetensors.torch import save_file

        t = {"thresholds": torch.from_numpy(np.ascontiguousarray(self.thresholds, dtype=np.float64))}
        if self.score_weight is not None:
            t["score_weight"] = torch.from_numpy(np.ascontiguousarray(self.score_weight, dtype=np.float32))
            t["score_bias"] = torch.from_numpy(np.ascontiguousarray(self.score_bias, dtype=np.float32))
        save_file(t, str(Path(state_dir) / WEIGHTS_FILE))
        return {"coverage": float(self.coverage), "thresholds": [round(float(v), 6) for v in self.thresholds],
                **self.info}

    @classmethod
    def load(cls, state_dir: str | Path, entry: dict[str, Any] | None) -> PredictionSets | None:
        """The sets saved in ``state_dir`` (None for states without them)."""
        path = Path(state_dir) / WEIGHTS_FILE
        if not entry or not path.is_file():
            return None
        from safetensors.torch import load_file

        t = load_file(str(path))
        w = t["score_weight"].numpy() if "score_weight" in t else None
        b = t["score_bias"].numpy() if "score_bias" in t else None
        info = {k: v for k, v in entry.items() if k not in ("coverage", "thresholds")}
        return cls(float(entry["coverage"]), t["thresholds"].numpy().astype(np.float64), w, b, info)
