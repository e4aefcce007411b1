"""How the real/fake verdict is chosen: a cross-validation on the training split only.

Reads a finished run of ``benchmarks.realworld`` (its last state and the frozen features its embedding store holds,
so nothing is recomputed) and compares, on the train rows of every task, with 5 stratified folds (the same inner
cross-fit of the threshold as the library's, :mod:`lorax.continual.verdict`):

* ``binary``: the class-balanced binary head on the super-feature (``continual.verdict: binary``);
* ``classsum``: the refit class head's fake classes' total, its threshold cross-fitted the same way.

Balanced accuracy at the fitted threshold, real photos called real, and AP on the held-out folds. The val split is
scored too, in a separate line marked "report only": nothing is chosen on it.

    python -m benchmarks.verdict_cv outputs/realworld/probe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def run_features(run: Path) -> dict[str, np.ndarray]:
    """Eval-view features, logits and labels of every train and val row of a finished run (from its stores)."""
    import pandas as pd

    from lorax.config import parse_params
    from lorax.continual.evaluation import predict_logits
    from lorax.continual.state import load_state
    from lorax.continual.summary import read_metrics
    from lorax.data.manifest import load_stream_manifests
    from pipelines.layout import Layout
    from pipelines.steps import embedding_store

    metrics = read_metrics(run / "metrics.json")
    method, info = load_state(run / "state" / metrics["tasks"][-1])
    params = parse_params(info["params"], str(run))
    manifests = run.parent / "manifests"
    store = embedding_store(params, Layout.run(params, run, manifests))
    df = pd.concat(load_stream_manifests(manifests, info["tasks"]).values(), ignore_index=True)
    _, feats = predict_logits(method, df, params, features=True, store=store, desc="features")
    from lorax.data.groups import row_groups

    return {"x": np.asarray(feats, np.float64), "class_id": df["class_id"].to_numpy(),
            "train": (df["split"] == "train").to_numpy(), "groups": row_groups(df).astype(str)}


def _class_probs(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, n_classes: int) -> np.ndarray:
    import torch

    from lorax.continual.head import refit_head

    w, b = refit_head(torch.from_numpy(xa).float(), torch.from_numpy(ya), n_classes, "refit", 1.0, 300)
    z = xb @ w.numpy().T.astype(np.float64) + b.numpy()
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def score(kind: str, xa: np.ndarray, ya: np.ndarray, ga: np.ndarray | None, xb: np.ndarray,
          n_classes: int) -> tuple[np.ndarray, float]:
    """Fake scores of ``xb`` and the threshold, both fitted on ``(xa, ya)`` only (inner folds by ``ga``)."""
    from lorax.continual.verdict import _folds, fit_verdict
    from lorax.utils.binary import fit_threshold

    if kind == "binary":
        v = fit_verdict(xa, ya % 2, ga)
        return v.fake_probability(xb), v.threshold
    fold, oof = _folds(ya % 2, ga, 5), np.zeros(len(ya))
    for k in range(5):
        oof[fold == k] = _class_probs(xa[fold != k], ya[fold != k], xa[fold == k], n_classes)[:, 1::2].sum(1)
    return _class_probs(xa, ya, xb, n_classes)[:, 1::2].sum(1), fit_threshold(oof, ya % 2, balanced=True)


def figures(s: np.ndarray, t: float, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score

    real, fake = float((s[y == 0] < t).mean()), float((s[y == 1] >= t).mean())
    return {"balanced": 50 * (real + fake), "real": 100 * real, "fake": 100 * fake,
            "ap": 100 * float(average_precision_score(y, s))}


def main(argv: list[str] | None = None) -> int:
    from lorax.continual.verdict import _folds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished run folder of benchmarks.realworld (e.g. outputs/realworld/probe)")
    ap.add_argument("--kinds", nargs="+", default=["binary", "classsum"], choices=["binary", "classsum"])
    ap.add_argument("--ungrouped", action="store_true", help="folds ignore the dataset's groups (to show the leak)")
    args = ap.parse_args(argv)
    d = run_features(Path(args.run))
    x, cid, train = d["x"], d["class_id"], d["train"]
    n_classes = int(cid.max()) + 1
    xt, yt = x[train], cid[train]
    gt = None if args.ungrouped else d["groups"][train]
    out = {}
    for kind in args.kinds:
        fold, s_all, parts = _folds(yt % 2, gt, 5), np.zeros(len(yt)), []
        for k in range(5):
            s, t = score(kind, xt[fold != k], yt[fold != k], None if gt is None else gt[fold != k], xt[fold == k],
                         n_classes)
            s_all[fold == k] = s
            parts.append(figures(s, t, yt[fold == k] % 2))
        cv = {key: float(np.mean([p[key] for p in parts])) for key in ("balanced", "real", "fake")}
        cv["ap"] = figures(s_all, 0.5, yt % 2)["ap"]
        s, t = score(kind, xt, yt, gt, x[~train], n_classes)
        out[kind] = {"train_cv": cv, "val_report_only": figures(s, t, cid[~train] % 2)}
        print(f"{kind}: train CV balanced {cv['balanced']:.1f} real {cv['real']:.1f} AP {cv['ap']:.1f} | "
              f"val (report only) balanced {out[kind]['val_report_only']['balanced']:.1f} "
              f"real {out[kind]['val_report_only']['real']:.1f} AP {out[kind]['val_report_only']['ap']:.1f}")
    name = "verdict_cv_ungrouped.json" if args.ungrouped else "verdict_cv.json"
    (Path(args.run) / name).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
