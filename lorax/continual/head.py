"""A convex head refit on stored features (``continual.head``: ``refit`` | ``lda`` | ``ncm``; ``linear`` = off).

After a task's adapter (and the AdamW head) are trained, the class head can be refit in closed form / by convex
optimisation on the super-features of the rows it was trained on (this task's train rows + the exemplar memory),
standardised with those rows' mean and std:

* ``refit``: multinomial logistic regression, L2 penalty ``0.5 * |W|^2`` against ``C * sum(cross-entropy)``
  (scikit-learn's objective; the bias is not penalised), solved by L-BFGS in float64.
* ``lda``: linear discriminant analysis with one shared, Ledoit-Wolf-shrunk covariance (scikit-learn's
  ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")``, priors = the rows' class shares): each class's
  border is set by its mean against a covariance pooled over every class, so an old class with a few exemplars
  borrows the shape of the others instead of being fitted from its own rows.
* ``ncm``: nearest class mean in the standardised space (logits ``z . m_c - |m_c|^2 / 2``).

The standardisation is folded into the returned weights, ``W' = W / std``, ``b' = b - W' . mean``, so the result is
an ordinary ``nn.Linear`` on the raw super-feature: it replaces the trained head in the state and evaluation,
prediction and serving read it unchanged.

``continual.cross_fit: k`` (:mod:`lorax.continual.cross_fit`): the refit, the verdict and the prediction sets are
fitted on super-features whose newest-task slice is out of fold (from k copies of the task, each trained without
the row's fold) instead of the newest adapter's in-sample one.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lorax.utils.progress import bar, timed

if TYPE_CHECKING:
    import pandas as pd

    from lorax.config import Params
    from lorax.features.store import FeatureStore
    from lorax.continual.conformal import PredictionSets
    from lorax.continual.methods import Method

log = logging.getLogger(__name__)

HEADS = ("linear", "refit", "lda", "ncm")
REFIT_HEADS = ("refit", "lda", "ncm")  # fitted in closed form / convexly on stored features after each task


def standardizer(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and std of ``x`` (std floored at ``eps``: constant columns stay 0 after standardising)."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(eps)
    return mean, std


def fit_logistic(z: torch.Tensor, y: torch.Tensor, n_classes: int, C: float = 1.0,
                 max_iter: int = 300, balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on (already standardised) ``z``: min C * sum CE + 0.5 |W|^2 (no bias penalty);
    ``balanced``: each row's CE weighted by ``n / (classes x its class's rows)`` (scikit-learn's
    ``class_weight="balanced"``). Returns ``(W (K, D), b (K))`` in float64; deterministic (full-batch L-BFGS from
    zero; in the row space of ``z`` when it is wider than tall, :func:`row_space`)."""
    from lorax.utils.linalg import row_space

    z = z.double()
    basis = row_space(z)
    if basis is not None:
        r, v = basis
        w, b = fit_logistic(r, y, n_classes, C, max_iter, balanced)
        return w @ v.T, b
    n, d = z.shape
    w = torch.zeros(n_classes, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    scale = 1.0 / (C * n)  # the objective divided by C * n: same minimiser, better-conditioned numbers
    progress = bar(desc=f"head refit L-BFGS ({n} x {d})", total=max_iter, unit="eval")
    weight = None
    if balanced:
        counts = torch.bincount(y, minlength=n_classes).double().clamp_min(1)
        weight = (n / (n_classes * counts))[y]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w.T + b
        ce = (torch.nn.functional.cross_entropy(logits, y) if weight is None  # the unweighted path as it always was
              else (torch.nn.functional.cross_entropy(logits, y, reduction="none") * weight).mean())
        loss = ce + 0.5 * scale * (w * w).sum()
        loss.backward()
        progress.update()
        return loss

    with torch.enable_grad(), progress:
        opt.step(closure)
    done = opt.state[w]
    log.debug("head refit: L-BFGS %d iterations, %d function evaluations", done.get("n_iter", 0),
              done.get("func_evals", 0))
    return w.detach(), b.detach()


def fit_lda(z: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrinkage LDA on ``z`` (module docstring) as ``(W (K, D), b (K))`` in float64; classes without rows are never
    chosen. Deterministic (closed form)."""
    import warnings

    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, labels = z.double().cpu().numpy(), torch.as_tensor(y).cpu().numpy()
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64)
    b = torch.full((n_classes,), -1e9, dtype=torch.float64)
    present = np.unique(labels)
    if len(present) == 1:  # one class: it is the answer
        b[int(present[0])] = 0.0
        return w, b
    with warnings.catch_warnings():  # a class with one row: its own covariance is zero, the pooled one is not
        warnings.filterwarnings("ignore", message="Only one sample available")
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, labels)
    coef, icpt = torch.from_numpy(lda.coef_), torch.from_numpy(lda.intercept_)
    if len(present) == 2:  # scikit-learn keeps one margin for two classes: logits (0, margin)
        b[int(present[0])] = 0.0
        w[int(present[1])], b[int(present[1])] = coef[0], icpt[0]
    else:
        w[torch.from_numpy(present)], b[torch.from_numpy(present)] = coef, icpt
    return w, b


def fit_ncm(z: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest class mean on ``z``: ``W = means``, ``b = -|means|^2 / 2`` (classes without rows: never chosen)."""
    z = z.double()
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64)
    b = torch.full((n_classes,), -1e9, dtype=torch.float64)
    for c in range(n_classes):
        sel = y == c
        if sel.any():
            w[c] = z[sel].mean(0)
            b[c] = -0.5 * (w[c] * w[c]).sum()
    return w, b


def refit_head(features: torch.Tensor, y: torch.Tensor, n_classes: int, kind: str = "refit", C: float = 1.0,
               max_iter: int = 300, balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (K, D), bias (K))`` in float32 of a linear head on the RAW ``features`` (N, D): fitted on the
    standardised features, the standardisation folded in (``balanced``: :func:`fit_logistic`'s class weights;
    refit only)."""
    if balanced and kind != "refit":
        raise ValueError(f"refit_head: balanced class weights are a logistic refit's; not {kind!r}")
    if kind not in REFIT_HEADS:
        raise ValueError(f"continual.head: {kind!r} is not a refit head ({' | '.join(REFIT_HEADS)})")
    x = features.double().cpu()
    y = torch.as_tensor(y, dtype=torch.long).cpu()
    missing = sorted(set(range(n_classes)) - set(y.unique().tolist()))
    if missing:
        log.warning("head refit: classes %s have no rows (no exemplar memory?): they are never predicted", missing)
    mean, std = standardizer(x)
    z = (x - mean) / std
    if kind == "ncm":
        w, b = fit_ncm(z, y, n_classes)
    elif kind == "lda":
        w, b = fit_lda(z, y, n_classes)
    else:
        w, b = fit_logistic(z, y, n_classes, C, max_iter, balanced)
    w_raw = w / std
    b_raw = b - w_raw @ mean
    return w_raw.float(), b_raw.float()


def _class_head(method: Method) -> torch.nn.Linear:
    head = getattr(getattr(method, "net", None), "head", None) or getattr(method, "head", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"continual.head: method {method.name!r} has no linear class head to refit")
    return head


def fit_heads(method: Method, rows: pd.DataFrame, params: Params, device: torch.device,
              store: FeatureStore | None = None, newest: np.ndarray | None = None) -> dict[str, Any]:
    """After a task's training: refit the class head (``continual.head`` refit | lda | ncm) and fit the real/fake
    verdict (``continual.verdict: binary``; :mod:`lorax.continual.verdict`) on the eval-view super-features of
    ``rows`` (this task's train rows + the replayed exemplars), and calibrates the prediction sets
    (``continual.set_coverage``; :mod:`lorax.continual.conformal`), the features computed once for all. ``newest``:
    the out-of-fold newest-task slice of every row (``continual.cross_fit``; :mod:`lorax.continual.cross_fit`), which
    then replaces the in-sample one in all three fits. Sets ``method.verdict`` and ``method.sets``; returns the state
    info's ``head`` entry (the verdict's and sets' entries are written by :func:`~lorax.continual.state.save_state`).
    """
    c = params.continual
    method.verdict = None
    method.sets = None
    if c.head == "linear" and c.verdict == "argmax" and not c.set_coverage:
        return {}
    from lorax.continual.evaluation import predict_logits  # the model stack: only when a head is fitted

    _, feats = predict_logits(method, rows, params, device, features=True, desc="head fit", store=store)
    if newest is not None:  # continual.cross_fit: the newest slice out of fold, the old slices as they are
        from lorax.continual.cross_fit import splice

        feats = splice(feats, newest)
    info = refit_class_head(method, rows, params, feats) if c.head != "linear" else {}
    if c.verdict == "binary":
        from lorax.continual.verdict import describe, fit_verdict

        t0 = time.time()
        from lorax.data.groups import row_groups

        groups = row_groups(rows)  # crops of one photo, one prompt's images: never split between folds
        method.verdict = fit_verdict(feats, rows["class_id"].to_numpy() % 2, groups)
        method.verdict.info["seconds"] = round(time.time() - t0, 2)
        v = method.verdict
        log.info("%s (%.1f s)", describe({**v.info, "kind": "binary", "threshold": v.threshold}), time.time() - t0)
    if c.set_coverage:  # prediction sets (lorax.continual.conformal), on the refit head's out-of-fold probabilities
        from lorax.data.groups import row_groups

        method.sets = fit_sets(feats, rows, _class_head(method).out_features, params, row_groups(rows))
    return info


def refit_class_head(method: Method, rows: pd.DataFrame, params: Params, feats: np.ndarray) -> dict[str, Any]:
    """Replace the class head by one refit (``continual.head``: refit | lda | ncm; :mod:`lorax.continual.head`) on
    ``feats``, the eval-view features (``eval.crops`` averaged) of ``rows`` (this task's train rows + the replayed
    exemplars). Returns the state info's ``head`` entry."""
    c = params.continual
    t0 = time.time()
    head = _class_head(method)
    x = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    if x.shape[1] != head.in_features:
        raise ValueError(f"continual.head: features of width {x.shape[1]} do not feed a head of {head.in_features}")
    with timed(log, f"head refit ({c.head}) on {len(rows)} rows x {x.shape[1]} features"):
        w, b = refit_head(x, torch.tensor(rows["class_id"].to_numpy(np.int64)), head.out_features, c.head,
                          c.head_c, c.head_max_iter)
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.device))
        head.bias.copy_(b.to(head.bias.device))
    return {"head": {"kind": c.head, "c": c.head_c, "rows": len(rows), "seconds": round(time.time() - t0, 2)}}


def _softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def oof_probabilities(x: np.ndarray, y: np.ndarray, n_classes: int, kind: str, C: float, max_iter: int,
                      fold: np.ndarray, k: int) -> np.ndarray:
    """(N, n_classes) probabilities of every row from a head (``kind``: refit | lda | ncm) fitted on the other
    folds."""
    out = np.full((len(y), n_classes), 1.0 / n_classes)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    for f in range(k):
        test, train = fold == f, fold != f
        if not test.any() or not train.any():
            continue
        w, b = refit_head(xt[torch.from_numpy(train)], torch.from_numpy(y[train]), n_classes, kind, C, max_iter)
        out[test] = _softmax_np(x[test] @ w.double().numpy().T + b.double().numpy())
    return out


def calibration_rows(rows: pd.DataFrame) -> tuple[np.ndarray, str]:
    """(mask, description) of the rows whose non-conformities calibrate the sets (:mod:`lorax.continual.conformal`):
    when some memory rows are calibration exemplars (``calib`` True), every row but the memory's selected ones
    (``calib`` False: herding's typical images); the train rows (no ``calib`` value) always count. Else all rows."""
    if "calib" not in rows.columns:
        return np.ones(len(rows), dtype=bool), "all rows (no exemplar memory)"
    flag = rows["calib"]
    if not flag.eq(True).any():
        return np.ones(len(rows), dtype=bool), "all rows (no calibration exemplars in the memory)"
    return ~flag.eq(False).to_numpy(bool), "train rows + the memory's calibration exemplars"


def fit_sets(features: np.ndarray, rows: pd.DataFrame, n_classes: int, params: Params,
             groups: np.ndarray | None = None) -> PredictionSets:
    """Calibrate the prediction sets (:mod:`lorax.continual.conformal`) on ``rows`` (the head's rows: train split +
    memory; a val row raises) and their eval-view super-features ``features``: Mondrian split-conformal on the
    out-of-fold probabilities of a ``FOLDS``-fold grouped cross-fit of the head (``continual.head`` refit | lda | ncm;
    a trained ``linear`` head: a logistic refit, kept with the sets as their score model)."""
    c = params.continual
    coverage = float(c.set_coverage)
    if "split" in rows.columns and (rows["split"].astype(str) == "val").any():
        raise ValueError("prediction sets: calibration rows include validation images; only the train split and "
                         "the exemplar memory may calibrate")
    t0 = time.time()
    x = np.asarray(features, dtype=np.float64)
    y = np.array(rows["class_id"], dtype=np.int64)  # a writable copy (torch takes it as is)
    n_tasks = n_classes // 2
    kind = c.head if c.head in REFIT_HEADS else "refit"
    from lorax.continual.conformal import (FOLDS, PredictionSets, label_scores, members, mondrian_thresholds,
                                           true_labels)
    from lorax.continual.verdict import _folds

    labels = true_labels(y, n_tasks)
    k = max(2, min(FOLDS, len(np.unique(groups)) if groups is not None else len(y)))
    fold = _folds(labels, groups, k) if groups is not None else np.random.default_rng(0).permutation(len(y)) % k
    probs = oof_probabilities(x, y, n_classes, kind, c.head_c, c.head_max_iter, fold, k)
    use, how = calibration_rows(rows)
    thresholds, info = mondrian_thresholds(label_scores(probs)[use], labels[use], coverage,
                                           conservative=not use.all())
    info["calibration"] = how
    weight = bias = None
    if c.head not in REFIT_HEADS:  # a trained head: the sets keep their own (refit) score model
        w, b = refit_head(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y), n_classes, "refit", c.head_c,
                          c.head_max_iter)
        weight, bias = w.numpy(), b.numpy()
    inside = members(label_scores(probs), thresholds)[use]
    info.update(score_model=("own refit (trained head)" if weight is not None else f"the model's head ({kind})"),
                folds=k, rows=len(y), calibration_rows=int(use.sum()),
                oof_coverage=round(100 * float(inside[np.arange(len(inside)), labels[use]].mean()), 2),
                oof_size=round(float(inside.sum(axis=1).mean()), 3), seconds=round(time.time() - t0, 2))
    log.info("prediction sets at %.0f%%: %d-fold cross-fit on %d rows, calibrated on %d (%s), thresholds %s%s "
             "(%.1f s)", 100 * coverage, k, len(y), int(use.sum()), how, np.round(thresholds, 3).tolist(),
             f", {info['fallback_rule']} quantile for labels {info['pooled_labels']}" if info["pooled_labels"] else "",
             info["seconds"])
    return PredictionSets(coverage, thresholds, weight, bias, info)
