"""The row a person reads: one schema for ``lorax predict``, the served model and the evaluation's predictions.

Every consumer builds its rows here, so the three never disagree (:data:`COLUMNS`, in this order):

* ``path``, ``status`` (``ok`` | ``error``), ``error`` (why a row could not be scored), ``width``, ``height``;
* ``verdict``: ``real`` or ``fake``, always ``fake_probability >= threshold``;
* ``fake_probability`` / ``threshold``: the model's stored verdict (:mod:`lorax.continual.verdict`) and the threshold
  it is compared with. A state without a stored verdict decides by the kind of its most probable class; its
  ``fake_probability`` is then the best fake class's share of (best fake + best real) and its threshold 0.5, which
  is the same decision written as a probability against a threshold;
* ``generator`` / ``generator_probability``: when the verdict is fake and the image is not ``unknown``, the task of
  the most probable fake class and its share of the fake classes' probability (which fake it is, given that it is
  fake); null otherwise;
* ``top``: the :data:`TOP_K` most probable classes, ``{"class": "<task>/<real|fake>", "probability": p}`` each,
  most probable first; always :data:`TOP_K` entries, padded with nulls when the model has fewer classes (or none,
  on an error row). A list in JSON and parquet, a JSON string in CSV (:func:`write_csv`);
* ``generators``: the prediction set (:mod:`lorax.continual.conformal`): the labels the model cannot rule out at
  its calibrated coverage (``continual.set_coverage``, e.g. 90%), each a generator (task) name or ``real``, most
  probable first, e.g. ``["sd15", "ddb"]``. It always holds the row's own answer (``real`` when the verdict is real,
  else the named generator), so a real verdict beside ``["real", "sd21"]`` reads "called real, but sd21 cannot be
  ruled out"; on an ``unknown`` row nothing is forced in (it may be empty). A list in JSON and parquet, a JSON
  string in CSV; null when the model has no calibrated sets (or on an error row);
* ``unknown`` / ``unknown_score``: the open-set score (:mod:`lorax.serving.openset`) and its rule: unknown only when
  the verdict is fake and the score is above the calibration's threshold; ``generator`` is then null, so a row never
  names a generator it also calls unknown. A real verdict is never unknown (a photo has no generator to be unknown).
  Both are null when the model has no open-set calibration;
* ``model_version``: the registry version that answered; null for a local state folder.

The per-class probabilities are not columns: their number changes with every model version (``top`` holds the
ones a reader needs). The evaluation adds ``task``, ``target`` and ``correct`` (:data:`EVAL_COLUMNS`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TOP_K = 3
COLUMNS = [
    "path", "status", "error", "width", "height", "verdict", "fake_probability", "threshold", "generator",
    "generator_probability", "top", "generators", "unknown", "unknown_score", "model_version",
]
DTYPES = {
    "path": "string", "status": "string", "error": "string", "width": "Int64", "height": "Int64",
    "verdict": "string", "fake_probability": "Float64", "threshold": "Float64", "generator": "string",
    "generator_probability": "Float64", "top": "object", "generators": "object", "unknown": "boolean", "unknown_score": "Float64",
    "model_version": "string",
}
EVAL_COLUMNS = ["task", "target", "correct"]
LIST_COLUMNS = ("top", "generators")  # lists in JSON and parquet, JSON text in CSV
ARGMAX_THRESHOLD = 0.5


def empty_top() -> list[None]:
    """``top`` of a row without a prediction: :data:`TOP_K` nulls."""
    return [None] * TOP_K


def scores(probs: np.ndarray, fake_score: np.ndarray | None, threshold: float | None) -> tuple[np.ndarray, float]:
    """``(fake_probability, threshold)`` of each row: the stored verdict's, or for the argmax rule the best fake
    class's share of (best fake + best real) against 0.5 (see the module docstring)."""
    if threshold is not None and fake_score is not None:
        return np.asarray(fake_score, dtype=np.float64).reshape(-1), float(threshold)
    probs = np.asarray(probs, dtype=np.float64)
    best_fake, best_real = probs[:, 1::2].max(axis=1), probs[:, 0::2].max(axis=1)
    return best_fake / np.maximum(best_fake + best_real, 1e-300), ARGMAX_THRESHOLD


def decided_rows(probs: np.ndarray, classes: Sequence[str], fake_score: np.ndarray | None, threshold: float | None,
                 unknown_score: np.ndarray | None = None, over_threshold: np.ndarray | None = None,
                 set_scores: np.ndarray | None = None, set_thresholds: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict[str, list[Any]]]:
    """The decided class of each row and the decision columns (``verdict`` .. ``unknown_score``) as lists.

    ``probs``: (N, C) class probabilities; ``fake_score`` / ``threshold``: the stored verdict (None: argmax rule);
    ``unknown_score`` / ``over_threshold``: the open-set score and whether it is above the calibration's threshold
    (None: no calibration); ``set_scores`` (N, T+1) / ``set_thresholds`` (T+1,): the prediction sets' label scores
    and calibrated thresholds (:class:`lorax.continual.conformal.PredictionSets`; None: no sets)."""
    from lorax.continual import conformal
    from lorax.continual.verdict import decide

    probs = np.asarray(probs, dtype=np.float64)
    fake_p, thr = scores(probs, fake_score, threshold)
    fake = fake_p >= thr
    pred = decide(probs, fake_p, thr)  # best fake class when fake, else best real class
    fake_total = probs[:, 1::2].sum(axis=1)
    unknown = None if over_threshold is None else fake & np.asarray(over_threshold, dtype=bool)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
    n = len(probs)
    cols: dict[str, list[Any]] = {c: [None] * n for c in ("verdict", "fake_probability", "threshold", "generator",
                                                          "generator_probability", "top", "generators", "unknown",
                                                          "unknown_score")}
    if set_scores is not None and set_thresholds is not None:
        answer = conformal.true_labels(pred, len(classes) // 2)  # the row's own label: always in its set ...
        if unknown is not None:
            answer = np.where(unknown, -1, answer)  # ... unless it names no generator (unknown)
        inside = conformal.members(set_scores, set_thresholds, answer)
        names = conformal.label_names([c.rsplit("/", 1)[0] for c in classes[1::2]])
        cols["generators"] = conformal.named_sets(inside, set_scores, names)
    for i in range(n):
        c = int(pred[i])
        named = bool(fake[i]) and not (unknown is not None and unknown[i])
        cols["verdict"][i] = "fake" if fake[i] else "real"
        cols["fake_probability"][i] = float(fake_p[i])
        cols["threshold"][i] = thr
        cols["generator"][i] = classes[c].rsplit("/", 1)[0] if named else None
        cols["generator_probability"][i] = float(probs[i, c] / fake_total[i]) if named else None
        top: list[dict[str, Any] | None] = [{"class": classes[int(k)], "probability": float(probs[i, k])}
                                            for k in order[i]]
        cols["top"][i] = top + [None] * (TOP_K - len(top))
        if unknown is not None:
            cols["unknown"][i] = bool(unknown[i])
            cols["unknown_score"][i] = float(np.asarray(unknown_score)[i])
    return pred, cols


def csv_ready(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``top`` and ``generators`` as JSON text (a CSV cell holds no list)."""
    lists = {c: [json.dumps(v) if isinstance(v, list) else v for v in table[c]]
             for c in LIST_COLUMNS if c in table.columns}
    return table.assign(**lists) if lists else table


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    """The table as CSV, ``top`` and ``generators`` as JSON strings; read it back with :func:`read_csv`."""
    csv_ready(table).to_csv(path, index=False)


def read_csv(path: str | Path) -> pd.DataFrame:
    """A CSV written by :func:`write_csv`, ``top`` and ``generators`` parsed back into lists (``generators``: None
    where empty)."""
    table = pd.read_csv(path)
    if "top" in table.columns:
        table["top"] = [json.loads(v) if isinstance(v, str) else empty_top() for v in table["top"]]
    if "generators" in table.columns:
        table["generators"] = [json.loads(v) if isinstance(v, str) else None for v in table["generators"]]
    return table
