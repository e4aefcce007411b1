"""Is the linear head the wall? ``python -m benchmarks.head_kinds``: other heads on a finished stream's features.

The refit head is a logistic regression on the standardised super-feature; on t2i its joint ceiling (every train row
of every task) was about 68 pooled with the probe's features (docs/results.md). A head that draws curved borders
could find what a linear one cannot. This fits each head kind on the last state's frozen super-features (read
through the stream's feature store: nothing is trained but the heads):

* ``cv``: grouped ``--folds``-fold cross-validation over every task's train rows (the dataset's groups, e.g. one t2i
  prompt, never straddle a fold), pooled multi-real accuracy on the held-out folds: the figure to choose by (val is
  not read for it);
* ``cv_memory``: the same folds, each head fitted only on the rows the stream's last head was fitted on (the last
  task's train rows + the memory) outside the fold, scored on the whole held-out fold: the stream's own fit, chosen
  without val;
* ``joint``: fitted on every train row, scored on val: the ceiling of each head with no memory limit (a diagnosis);
* ``memory``: fitted on what the last head was fitted on (the last task's train rows + the memory before it),
  scored on val: what the stream itself would get from that head.

Head kinds: ``logistic`` (the stream's own refit, :func:`lorax.continual.head.refit_head`), ``lda`` (shrinkage
LDA: one shared covariance), ``svm`` (RBF kernel), ``mlp`` (one hidden layer, early stopping), ``knn`` (cosine, 15
neighbours, distance-weighted); all on standardised features.

    python -m benchmarks.head_kinds --run OUT/probe --manifests M --data ../shared/data/t2i -S cache.dir=C \\
        --out outputs/head_kinds
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipelines.cli.settings import parse_overrides

Fit = Callable[[np.ndarray, np.ndarray, int], Callable[[np.ndarray], np.ndarray]]


def _logistic(c: float, max_iter: int) -> Fit:
    def fit(x: np.ndarray, y: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
        from lorax.continual.head import refit_head

        w, b = refit_head(torch.tensor(x), torch.tensor(y), k, "refit", c, max_iter)
        return lambda z: z @ w.double().numpy().T + b.double().numpy()
    return fit


def _sklearn(make: Callable[[int], Any]) -> Fit:
    """A scikit-learn classifier on standardised features; its class scores spread over all ``k`` classes."""
    def fit(x: np.ndarray, y: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
        mean, std = x.mean(0), x.std(0) + 1e-6
        model = make(k).fit((x - mean) / std, y)

        def scores(z: np.ndarray) -> np.ndarray:
            zs = (z - mean) / std
            raw = model.predict_proba(zs) if hasattr(model, "predict_proba") else model.decision_function(zs)
            if raw.ndim == 1:  # a two-class decision function: one margin
                raw = np.stack([-raw, raw], 1)
            out = np.full((len(z), k), -np.inf)
            out[:, model.classes_] = raw
            return out
        return scores
    return fit


def head_kinds(c: float = 1.0, max_iter: int = 300, seed: int = 0) -> dict[str, Fit]:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    return {
        "logistic": _logistic(c, max_iter),
        "lda": _sklearn(lambda k: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")),
        "svm": _sklearn(lambda k: SVC(kernel="rbf", C=10.0, gamma="scale", decision_function_shape="ovr")),
        "mlp": _sklearn(lambda k: MLPClassifier((512,), alpha=1e-2, early_stopping=True, max_iter=400,
                                                random_state=seed)),
        "knn": _sklearn(lambda k: KNeighborsClassifier(15, weights="distance", metric="cosine")),
    }


def pooled(scores: np.ndarray, target: np.ndarray) -> float:
    from lorax.continual.metrics import multi_real_correct

    return round(float(100 * multi_real_correct(scores.argmax(1), target).mean()), 2)


def evaluate_heads(kinds: dict[str, Fit], train: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                   val: tuple[np.ndarray, np.ndarray], memory: tuple[np.ndarray, np.ndarray], k: int
                   ) -> dict[str, dict[str, Any]]:
    """Per head kind: ``cv`` (mean and per fold over ``train``'s fold ids), ``cv_memory`` (the same folds, each
    fitted only on the rows of ``train``'s head mask outside the fold: the stream's fit, cross-validated),
    ``joint`` and ``memory`` (on ``val``) and seconds. ``train`` = (features, class ids, fold ids, head mask),
    ``val``/``memory`` = (features, class ids)."""
    x, y, folds, head_rows = train
    out: dict[str, dict[str, Any]] = {}
    for name, fit in kinds.items():
        t0 = time.perf_counter()
        per_fold, per_fold_memory = [], []
        for f in sorted(set(folds.tolist())):
            held = folds == f
            per_fold.append(pooled(fit(x[~held], y[~held], k)(x[held]), y[held]))
            use = head_rows & ~held
            per_fold_memory.append(pooled(fit(x[use], y[use], k)(x[held]), y[held]))
        out[name] = {"cv": round(float(np.mean(per_fold)), 2), "cv_std": round(float(np.std(per_fold)), 2),
                     "cv_folds": per_fold, "cv_memory": round(float(np.mean(per_fold_memory)), 2),
                     "cv_memory_std": round(float(np.std(per_fold_memory)), 2),
                     "cv_memory_folds": per_fold_memory, "joint": pooled(fit(x, y, k)(val[0]), val[1]),
                     "memory": pooled(fit(*memory, k)(val[0]), val[1]),
                     "seconds": round(time.perf_counter() - t0, 1)}
    return out


def stream_features(run: Path, manifests: dict[str, pd.DataFrame], cache: Any, folds: int, seed: int
                    ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], tuple[np.ndarray, ...], int]:
    """The last state's super-features of every train row (with grouped fold ids and the mask of the rows its head
    was fitted on), of every val row, and of the rows its head was fitted on (last task's train rows + the memory
    before it, in the stream's order), through the stream's store."""
    from benchmarks.head_memory import last_state
    from lorax.continual.evaluation import predict_logits, val_rows
    from lorax.data.folds import assign_folds

    tasks = list(manifests)
    method, p, store, new, memory = last_state(run, manifests, cache)

    def feats(rows: pd.DataFrame, what: str) -> tuple[np.ndarray, np.ndarray]:
        _, f = predict_logits(method, rows, p, features=True, desc=f"head_kinds {what}", store=store)
        return np.asarray(f, np.float64), rows["class_id"].to_numpy(np.int64)

    def key(rows: pd.DataFrame) -> pd.Series:
        return rows["task"].astype(str) + "/" + rows["path"].astype(str)

    train = pd.concat([m[m["split"] == "train"] for m in manifests.values()], ignore_index=True)
    x, y = feats(train, "train")
    # the head's rows, in the order the trainer fitted them: every one is a train row, so no second pass
    fitted = pd.Series(np.arange(len(train)), index=key(train)).loc[key(pd.concat([new, memory]))].to_numpy()
    head_rows = np.zeros(len(train), dtype=bool)
    head_rows[fitted] = True
    return ((x, y, assign_folds(train, folds, seed), head_rows), feats(val_rows([manifests[t] for t in tasks]), "val"),
            (x[fitted], y[fitted]), 2 * len(tasks))


def markdown(res: dict[str, dict[str, Any]]) -> str:
    lines = ["| head | train CV, every train row (mean +- std) | train CV, task + memory rows | val, fitted on every "
             "train row | val, fitted on task + memory | s |", "|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['cv']:.1f} +- {r['cv_std']:.1f} | {r['cv_memory']:.1f} +- "
                     f"{r['cv_memory_std']:.1f} | {r['joint']:.1f} | {r['memory']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.head_memory import finished_stream, report, stream_parser

    ap = stream_parser(__doc__)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--heads", nargs="+", help="head kinds (default: all)")
    ap.add_argument("--out", default="outputs/head_kinds")
    args = ap.parse_args(argv)
    from lorax.config import load_params

    p = load_params(args.params, parse_overrides(args.set))
    run = Path(args.run)
    manifests = finished_stream(run, args.manifests, args.data or p.data.root)
    kinds = head_kinds(p.continual.head_c, p.continual.head_max_iter, p.seed)
    unknown = set(args.heads or []) - set(kinds)
    if unknown:
        ap.error(f"--heads: unknown {sorted(unknown)}; known: {', '.join(kinds)}")
    kinds = {k: v for k, v in kinds.items() if not args.heads or k in args.heads}
    train, val, memory, k = stream_features(run, manifests, p.cache, args.folds, p.seed)
    res = evaluate_heads(kinds, train, val, memory, k)
    report(Path(args.out), "head_kinds", res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
