"""Continual-attribution metrics (LoRAX / DyTox conventions). (Over 350 lines: every figure of the protocol,
defined once and side by side, so that the definitions can be read and checked together.)

Class layout: task ``i`` owns class ``2i`` (its real images) and ``2i+1`` (its fakes).

Multi-real accuracy: a real image (even target) predicted as *any* real class is correct, because real
photos carry no generator trace and the task they were paired with is arbitrary; a fake image must get
exactly its own generator's class. Accuracies and APs are returned in percent (0..100) as plain floats.

Accuracy matrix ``R`` (T x T): ``R[i, j]`` = accuracy on task ``i`` after training task ``j``; entries with
``i > j`` (task not seen yet) are NaN. From it:

* ``aa``  = (1/T) sum_j mean(R[0..j, j])           average incremental accuracy, as in DyTox
* ``aaf`` = (1/T) sum_i R[i, T-1]                  average accuracy after the last task
* ``bwt`` = 1/(T-1) sum_{i<T-1} (R[i, T-1] - R[i, i])  backward transfer; 0 for a single task
* ``forgetting`` = -bwt                            (the paper's definition, not Chaudhry's max-based one)

Empty input: an accuracy over zero images raises ``ValueError`` (a task without validation images is a
data error, not a 0% or 100% task); an AP whose task lacks real or fake images is NaN (AP is undefined).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "AccuracyMatrix",
    "aa",
    "aaf",
    "binary_accuracy",
    "binary_decision",
    "bwt",
    "confusion_matrix",
    "evaluate_logits",
    "fake_probability",
    "forgetting",
    "multi_real_correct",
    "per_task_ap",
    "prediction_table",
    "softmax",
    "summarize",
    "task_accuracy",
]


def class_names(tasks: Sequence[str]) -> list[str]:
    """Task i owns class 2i (its real images) and 2i+1 (its fakes): ``<task>/real``, ``<task>/fake``."""
    return [f"{t}/{kind}" for t in tasks for kind in ("real", "fake")]


def _int_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred).reshape(-1), np.asarray(target).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.size} entries but target has {target.size}; they must match")
    if (pred < 0).any() or (target < 0).any():
        raise ValueError("class ids must be >= 0")
    return pred.astype(np.int64), target.astype(np.int64)


def multi_real_correct(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image correctness: real (even target) -> any even prediction; fake -> exactly its class."""
    pred, target = _int_pair(pred, target)
    is_real = target % 2 == 0
    return np.where(is_real, pred % 2 == 0, pred == target)


def _percent(correct: np.ndarray, what: str) -> float:
    if correct.size == 0:
        raise ValueError(f"{what}: no images to score; every evaluated task needs validation images")
    return float(100.0 * correct.mean())


def task_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Multi-real accuracy in percent: mean of ``multi_real_correct``. Raises on empty input."""
    return _percent(multi_real_correct(pred, target), "task_accuracy")


def binary_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Real-vs-fake accuracy in percent: ``pred % 2 == target % 2`` (the generator is ignored)."""
    pred, target = _int_pair(pred, target)
    return _percent(pred % 2 == target % 2, "binary_accuracy")


# ---------------------------------------------------------------- accuracy matrix


def _check_R(R: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {R.shape}")
    upper = R[np.triu_indices(R.shape[0])]
    if not np.isfinite(upper).all():
        raise ValueError("accuracy matrix has non-finite entries at i <= j (a seen task was not evaluated)")
    return R


def aa(R: np.ndarray) -> float:
    """Average incremental accuracy (DyTox): ``mean_j mean(R[0..j, j])``."""
    R = _check_R(R)
    return float(np.mean([R[: j + 1, j].mean() for j in range(R.shape[0])]))


def aaf(R: np.ndarray) -> float:
    """Average accuracy after the last task: ``mean_i R[i, T-1]``."""
    R = _check_R(R)
    return float(R[:, -1].mean())


def bwt(R: np.ndarray) -> float:
    """Backward transfer: ``mean_{i<T-1} (R[i, T-1] - R[i, i])``; 0 for a single task. Negative = forgetting."""
    R = _check_R(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([R[i, -1] - R[i, i] for i in range(T - 1)]))


def forgetting(R: np.ndarray) -> float:
    """``-bwt(R)``: positive when old tasks lost accuracy."""
    return -bwt(R)


def summarize(R: np.ndarray) -> dict[str, float]:
    """``{"aa", "aaf", "bwt", "forgetting"}`` of an accuracy matrix, in the matrix's units (percent)."""
    b = bwt(R)
    return {"aa": aa(R), "aaf": aaf(R), "bwt": b, "forgetting": -b}


class AccuracyMatrix:
    """Grows one column per training step: after step ``j`` call ``add_step(accs)`` with R[0..j, j].

    ``values`` is the T x T matrix of the steps done (NaN below the diagonal), ready for ``summarize``.
    """

    def __init__(self, columns: Sequence[Sequence[float]] = ()) -> None:
        self._cols: list[list[float]] = []
        for c in columns:
            self.add_step(c)

    def add_step(self, accs: Sequence[float]) -> None:
        j = len(self._cols)
        accs = [float(a) for a in accs]
        if len(accs) != j + 1:
            raise ValueError(f"step {j} must report accuracies of tasks 0..{j} ({j + 1} values), got {len(accs)}")
        if not np.isfinite(accs).all():
            raise ValueError(f"step {j}: non-finite accuracy {accs}")
        self._cols.append(accs)

    def __len__(self) -> int:
        return len(self._cols)

    @property
    def values(self) -> np.ndarray:
        T = len(self._cols)
        R = np.full((T, T), np.nan)
        for j, col in enumerate(self._cols):
            R[: j + 1, j] = col
        return R

    def to_list(self) -> list[list[float | None]]:
        """Rows of R as lists (JSON-friendly: NaN -> None)."""
        return [[None if np.isnan(v) else float(v) for v in row] for row in self.values]

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[float | None]]) -> AccuracyMatrix:
        R = _check_R([[np.nan if v is None else v for v in row] for row in rows])
        return cls([R[: j + 1, j] for j in range(R.shape[0])])

    def summary(self) -> dict[str, float]:
        if not self._cols:
            raise ValueError("accuracy matrix is empty: no step recorded yet")
        return summarize(self.values)


# ---------------------------------------------------------------- per-image scores


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (shifted by the row max for stability)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fake_probability(probs: np.ndarray) -> np.ndarray:
    """Score that an image is fake: summed probability of all fake (odd) classes."""
    return np.asarray(probs)[:, 1::2].sum(axis=1)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """``cm[t, p]`` = number of images of class ``t`` predicted as ``p`` (int64, n_classes x n_classes)."""
    pred, target = _int_pair(pred, target)
    if pred.size and max(pred.max(), target.max()) >= n_classes:
        raise ValueError(f"class id {max(pred.max(), target.max())} out of range for n_classes={n_classes}")
    if pred.size == 0:
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    from sklearn.metrics import confusion_matrix  # imported here: sklearn costs every pipeline stage ~1 s to import

    return confusion_matrix(target, pred, labels=np.arange(n_classes)).astype(np.int64)


def per_task_ap(fake_score: np.ndarray, target: np.ndarray, n_tasks: int | None = None) -> list[float]:
    """Average precision (percent) of real-vs-fake per task, fakes positive; task = ``target // 2``.

    NaN for a task with no images or with only one of real/fake (AP is undefined there).
    ``n_tasks`` defaults to ``max(target) // 2 + 1``.
    """
    score = np.asarray(fake_score, dtype=np.float64).reshape(-1)
    target = np.asarray(target).reshape(-1).astype(np.int64)
    if score.shape != target.shape:
        raise ValueError(f"fake_score has {score.size} entries but target has {target.size}")
    task = target // 2
    n_tasks = int(task.max()) + 1 if n_tasks is None else n_tasks
    out = []
    for t in range(n_tasks):
        m = task == t
        y = target[m] % 2
        if m.sum() == 0 or y.min() == y.max():
            out.append(float("nan"))
        else:
            from sklearn.metrics import average_precision_score

            out.append(float(100.0 * average_precision_score(y, score[m])))
    return out


def binary_decision(fake_score: np.ndarray, is_fake: np.ndarray, folds: int = 2) -> dict[str, float]:
    """Real/fake decision with a fitted threshold on the fake probability; percent, plus the threshold.

    A continual stream keeps no held-out training data, so the threshold is fitted on the validation images of
    the seen tasks (as the open-set calibration is). ``binary_threshold`` is fitted on all of them (the one to
    deploy); ``binary_acc_fitted`` is cross-fitted, each of ``folds`` stratified folds scored with the threshold
    fitted on the others, so no image is scored by a threshold fitted on it. ``binary_ap``: pooled, threshold-free
    AP (fakes positive); NaN when only one class is present.
    """
    from lorax.utils.binary import fit_threshold

    score = np.asarray(fake_score, dtype=np.float64).reshape(-1)
    y = np.asarray(is_fake).reshape(-1).astype(np.int64)
    if score.shape != y.shape or score.size == 0:
        raise ValueError(f"binary_decision: {score.size} scores for {y.size} labels; need one per image, at least one")
    fold = np.zeros(y.size, dtype=np.int64)
    for lab in (0, 1):  # stratified, deterministic: every folds-th image of each class
        idx = np.flatnonzero(y == lab)
        fold[idx] = np.arange(idx.size) % folds
    ok = np.zeros(y.size, dtype=bool)
    for f in range(folds):
        test, fit = fold == f, fold != f
        if not test.any():
            continue
        t = fit_threshold(score[fit], y[fit]) if fit.any() else 0.5
        ok[test] = (score[test] >= t) == (y[test] == 1)
    if y.min() == y.max():
        ap = float("nan")
    else:
        from sklearn.metrics import average_precision_score

        ap = float(100.0 * average_precision_score(y, score))
    return {"binary_acc_fitted": float(100.0 * ok.mean()), "binary_threshold": fit_threshold(score, y),
            "binary_ap": ap}


def _check_eval_inputs(logits: np.ndarray, targets: np.ndarray, task_ids: np.ndarray, n_tasks_seen: int):
    logits = np.asarray(logits)
    targets = np.asarray(targets).reshape(-1).astype(np.int64)
    task_ids = np.asarray(task_ids).reshape(-1).astype(np.int64)
    if logits.ndim != 2 or not (len(logits) == len(targets) == len(task_ids)):
        raise ValueError(
            f"logits {logits.shape}, targets {targets.shape} and task_ids {task_ids.shape} must have one row per image"
        )
    if n_tasks_seen < 1 or logits.shape[1] < 2 * n_tasks_seen:
        raise ValueError(f"logits have {logits.shape[1]} classes; {n_tasks_seen} seen task(s) need {2 * n_tasks_seen}")
    if (targets // 2 != task_ids).any():
        bad = int(np.flatnonzero(targets // 2 != task_ids)[0])
        raise ValueError(
            f"image {bad}: target {targets[bad]} does not belong to task {task_ids[bad]} (class = 2*task + label)"
        )
    return logits, targets, task_ids


def evaluate_logits(logits: np.ndarray, targets: np.ndarray, task_ids: np.ndarray, n_tasks_seen: int,
                    fake_score: np.ndarray | None = None, threshold: float | None = None,
                    set_scores: np.ndarray | None = None, set_thresholds: np.ndarray | None = None) -> dict:
    """All metrics of one evaluation after training ``n_tasks_seen`` tasks.

    ``fake_score`` / ``threshold``: the model's verdict (:mod:`lorax.continual.verdict`): its fake probability of
    each image and the threshold stored with the model. Every decision (the predicted class, hence the accuracies)
    then goes through :func:`lorax.continual.verdict.decide`; without them the fake probability is the fake classes'
    total and the class is the argmax.

    Only the first ``2 * n_tasks_seen`` logits (the seen classes) are used, and images of tasks not seen yet
    (``task_id >= n_tasks_seen``) are ignored. Every seen task must have images (else ``ValueError``).

    Returns plain Python values: ``task_acc`` (list, multi-real %, one per seen task; a column of R),
    ``mean_acc`` (mean of task_acc), ``binary_acc`` (% over all images), ``binary_acc_per_task``,
    ``task_ap`` (list, %, NaN where undefined), ``mean_ap`` (nan-mean), ``confusion`` (list of lists,
    ``2*n_tasks_seen`` square, rows = target), ``n_images`` (per task), ``pooled_acc`` (multi-real % over all
    images), ``pooled_acc_argmax`` (the same with the plain argmax, for comparison), the verdict's ``real_acc`` (%
    of real images called real), ``fake_acc`` and ``balanced_acc`` (their mean) of the decision
    (``verdict_threshold``: the stored threshold; None when the argmax decides), and :func:`binary_decision`'s
    ``binary_acc_fitted`` (threshold cross-fitted on these val images: a reference, not the deployed decision),
    ``binary_threshold`` (fitted on them), ``binary_ap``. With the prediction sets' ``set_scores`` (N, T+1) and
    ``set_thresholds`` (:mod:`lorax.continual.conformal`), also :func:`~lorax.continual.conformal.set_metrics`'s
    ``set_coverage`` (%), ``set_size`` (labels) and their per-task and per-label lists.
    """
    logits, targets, task_ids = _check_eval_inputs(logits, targets, task_ids, n_tasks_seen)
    keep = task_ids < n_tasks_seen
    logits, targets, task_ids = logits[keep, : 2 * n_tasks_seen], targets[keep], task_ids[keep]
    n_images = [int((task_ids == t).sum()) for t in range(n_tasks_seen)]
    empty = [t for t, n in enumerate(n_images) if n == 0]
    if empty:
        raise ValueError(f"evaluate_logits: seen task(s) {empty} have no images; check the validation manifests")
    from lorax.continual.verdict import decide

    probs = softmax(logits)
    if fake_score is None:
        fake_p = fake_probability(probs)
    else:
        fake_p = np.asarray(fake_score, dtype=np.float64).reshape(-1)[keep]
    pred = decide(probs, fake_p, threshold)
    correct = multi_real_correct(pred, targets)
    task_acc = [float(100.0 * correct[task_ids == t].mean()) for t in range(n_tasks_seen)]
    bin_ok = pred % 2 == targets % 2
    is_fake = targets % 2 == 1
    called_fake = pred % 2 == 1  # the decision itself (the verdict's threshold, or the argmax's kind)
    real_acc = float(100.0 * (~called_fake[~is_fake]).mean()) if (~is_fake).any() else float("nan")
    fake_acc = float(100.0 * called_fake[is_fake].mean()) if is_fake.any() else float("nan")
    task_ap = per_task_ap(fake_p, targets, n_tasks_seen)
    finite_ap = [a for a in task_ap if np.isfinite(a)]
    sets = {}
    if set_scores is not None and set_thresholds is not None:
        from lorax.continual import conformal

        cols = [*range(n_tasks_seen), np.shape(set_scores)[1] - 1]  # the seen generators and real
        inside = conformal.members(np.asarray(set_scores)[keep][:, cols], np.asarray(set_thresholds)[cols],
                                   conformal.true_labels(pred, n_tasks_seen))
        sets = conformal.set_metrics(inside, conformal.true_labels(targets, n_tasks_seen), task_ids, n_tasks_seen)
    return {
        **sets,
        "task_acc": task_acc,
        "mean_acc": float(np.mean(task_acc)),
        "pooled_acc": float(100.0 * correct.mean()),
        "pooled_acc_argmax": float(100.0 * multi_real_correct(probs.argmax(axis=1), targets).mean()),
        **binary_decision(fake_p, targets % 2),
        "verdict_threshold": None if threshold is None else float(threshold),
        "real_acc": real_acc,
        "fake_acc": fake_acc,
        "balanced_acc": float(np.nanmean([real_acc, fake_acc])),
        "binary_acc": float(100.0 * bin_ok.mean()),
        "binary_acc_per_task": [float(100.0 * bin_ok[task_ids == t].mean()) for t in range(n_tasks_seen)],
        "task_ap": task_ap,
        "mean_ap": float(np.mean(finite_ap)) if finite_ap else float("nan"),
        "confusion": confusion_matrix(pred, targets, 2 * n_tasks_seen).tolist(),
        "n_images": n_images,
    }


def prediction_table(
    paths: Sequence[str],
    logits: np.ndarray,
    targets: np.ndarray,
    task_ids: np.ndarray,
    task_names: Sequence[str] | None = None,
    fake_score: np.ndarray | None = None,
    threshold: float | None = None,
    set_scores: np.ndarray | None = None,
    set_thresholds: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per image in the row schema of ``lorax predict`` (:mod:`lorax.serving.schema`; no open-set score,
    no registry version, no image size: those stay null), then ``task`` (the image's task), ``target`` (its true
    class, ``<task>/<real|fake>``) and ``correct`` (multi-real).

    Uses all logit columns (the head's classes); ``task_names`` names them (default: the task indices).
    ``fake_score`` / ``threshold`` / ``set_scores`` / ``set_thresholds``: the model's verdict and prediction sets,
    as in :func:`evaluate_logits`.
    """
    from lorax.serving.schema import COLUMNS, DTYPES, EVAL_COLUMNS, decided_rows

    logits = np.asarray(logits)
    n_tasks = logits.shape[1] // 2 if logits.ndim == 2 else 0
    logits, targets, task_ids = _check_eval_inputs(logits, targets, task_ids, max(n_tasks, 1))
    if len(paths) != len(logits):
        raise ValueError(f"{len(paths)} paths for {len(logits)} rows of logits")
    names = list(task_names) if task_names is not None else [str(t) for t in range(n_tasks)]
    if len(names) < n_tasks:
        raise ValueError(f"{n_tasks} tasks in the logits, {len(names)} in task_names")
    classes = class_names(names[:n_tasks])
    pred, decided = decided_rows(softmax(logits), classes, fake_score, threshold, set_scores=set_scores,
                                 set_thresholds=set_thresholds)
    n = len(paths)
    table: dict[str, list] = {c: [None] * n for c in COLUMNS}
    table.update(path=list(paths), status=["ok"] * n, **decided)
    table["task"] = [names[t] for t in task_ids]
    table["target"] = [classes[t] for t in targets]
    table["correct"] = multi_real_correct(pred, targets).tolist()
    return pd.DataFrame(table)[COLUMNS + EVAL_COLUMNS].astype({**DTYPES, "task": "string", "target": "string",
                                                              "correct": "bool"})
