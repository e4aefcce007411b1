"""CLIP-MoLE on real generators, protocols (a) and (c): ``python -m benchmarks.detect_t2i``.

Train on one t2i generator's train split (default sd15), fit the threshold on its val split, and report AP and
accuracy on the val split of every other t2i generator and on every image of each ``--realworld`` generator, for the
methods probe / shared / separate / mole in one run (rows: methods; columns: generators; the paper's table format).
Robustness (protocol c): the same detectors on perturbed crops (JPEG, blur, down-and-up scaling) of the unseen t2i
generators' val images (``--robust-per-class`` reals and fakes per generator), against the clean figure on the same
images.

Settings are the ``detect`` section of ``--params`` (``params.realworld.yaml``: the real-image profile); the probe's C
(also every method's head start) is chosen by grouped cross-validation on the training generator's train split only
(groups = the t2i manifest's ``group`` column, the prompt), scored by AP on the held-out folds' crops clean, under
JPEG 75 and under blur sigma 1. Nothing is chosen on another generator. Every crop goes through the frozen trunk once
(:class:`lorax.detect.trunk_features.TrunkFeatures`: kept in the feature store); the methods share those tensors.

Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GroupKFold

from lorax.config import Params, load_params
from lorax.data.manifest import read_manifest
from lorax.detect.evaluate import fit_threshold, generator_metrics
from lorax.detect.fixed_views import fit_detector, score_frame
from lorax.detect.runner import detect_params
from lorax.detect.trunk import embed_from_trunk, perturbations
from lorax.detect.trunk_features import TrunkFeatures
from lorax.features import open_store
from lorax.features.store import FeatureStore

log = logging.getLogger("detect_t2i")

METHODS = ["probe", "shared", "separate", "mole"]
CV_PERTURB = ("jpeg75", "blur1")


def _labels(df: pd.DataFrame) -> np.ndarray:
    return (df["class_id"].to_numpy() % 2).astype(int)


def _frames(folder: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: read_manifest(p) for p in sorted(folder.glob("*.parquet"))}


def _split(df: pd.DataFrame, split: str) -> pd.DataFrame:
    return df[df["split"] == split].reset_index(drop=True)


def robust_subset(df: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """The first ``per_class`` reals and fakes of ``df`` by path (all of a class when it has fewer)."""
    parts = [g.sort_values("path").head(per_class) for _, g in df.groupby(_labels(df))]
    return pd.concat(parts).sort_values("path").reset_index(drop=True)


@torch.no_grad()
def _features(trunk: TrunkFeatures, cached) -> np.ndarray:
    det = trunk.encoder
    out = [embed_from_trunk(det, cached.tokens[i:i + 64], cached.pre[i:i + 64], trunk.start).float()
           for i in range(0, len(cached), 64)]
    return torch.cat(out).numpy()


def cv_probe_c(trunk: TrunkFeatures, train_df: pd.DataFrame, groups: np.ndarray, cs: list[float], seed: int,
               folds: int = 4) -> dict[str, Any]:
    """Grouped k-fold CV of the probe's C on the training split: fit on the training folds' views, AP of the
    held-out images' eval crops (clean, JPEG 75, blur 1), mean over folds and conditions."""
    views = trunk.train(train_df, seed)
    fv = _features(trunk, views)
    held = {"clean": trunk.eval(train_df)}
    held.update({name: trunk.eval(train_df, name) for name in CV_PERTURB})
    fh = {k: _features(trunk, v) for k, v in held.items()}
    y = _labels(train_df)
    table: dict[str, dict[str, float]] = {}
    for c in cs:
        aps: dict[str, list[float]] = {k: [] for k in held}
        for tr, te in GroupKFold(n_splits=folds).split(np.zeros(len(y)), y, groups):
            m = np.isin(views.rows, tr)
            mu, sd = fv[m].mean(0), fv[m].std(0) + 1e-6
            lr = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit((fv[m] - mu) / sd,
                                                                                   views.labels[m])
            for k, cached in held.items():
                keep = np.isin(cached.rows, te)
                logit = lr.decision_function((fh[k][keep] - mu) / sd)
                rows = cached.rows[keep]
                img = pd.Series(logit).groupby(rows).mean()
                aps[k].append(100 * average_precision_score(y[img.index.to_numpy()], img.to_numpy()))
        table[f"{c:g}"] = {k: float(np.mean(v)) for k, v in aps.items()}
        table[f"{c:g}"]["mean"] = float(np.mean(list(table[f"{c:g}"].values())))
        log.info("CV C=%g: %s", c, table[f"{c:g}"])
    best = max(table, key=lambda k: table[k]["mean"])
    return {"table": table, "best": float(best), "folds": folds}


def open_inputs(args: argparse.Namespace) -> tuple[Params, TrunkFeatures, dict[str, pd.DataFrame],
                                                  dict[str, pd.DataFrame]]:
    """The detector's settings, its frozen trunk's outputs (in the feature store: ``--cache``, else the profile's
    ``cache:``) and the t2i / realworld manifests (the latter {} when not given): what every t2i detection
    benchmark starts from, so they read the same profile and share one store."""
    params = detect_params(load_params(args.params, _overrides(args.set)))
    cfg, mcfg = params.detect, params.model
    torch.set_num_threads(args.threads)
    store = open_store(params.cache) if args.cache is None else FeatureStore(args.cache, params.cache.max_mb)
    trunk = TrunkFeatures(store, mcfg, cfg, batch_size=params.eval.batch_size)
    return params, trunk, _frames(args.t2i), _frames(args.realworld) if args.realworld else {}


def run(args: argparse.Namespace) -> dict[str, Any]:
    params, trunk, t2i, rw = open_inputs(args)
    cfg, mcfg = params.detect, params.model
    train_task = args.train_task
    train_df, val_df = _split(t2i[train_task], "train"), _split(t2i[train_task], "val")
    others = {t: _split(df, "val") for t, df in t2i.items() if t != train_task}
    result: dict[str, Any] = {"command": "python -m benchmarks.detect_t2i " + shlex.join(sys.argv[1:]),
                              "detect": cfg.model_dump(mode="json"), "model": mcfg.model_dump(mode="json"),
                              "train_task": train_task, "trunk_start": trunk.start, "methods": {}}
    t0 = time.perf_counter()
    views = trunk.train(train_df, params.seed)
    result["trunk_train_seconds"] = time.perf_counter() - t0

    probe_c = cfg.probe_c
    if args.cv_c:
        gm = pd.read_csv(args.groups, usecols=["path", "group"])
        groups = train_df["path"].map(dict(zip(gm["path"], gm["group"], strict=True)))
        if groups.isna().any():
            raise ValueError(f"{args.groups}: no group for {int(groups.isna().sum())} training images")
        cv = cv_probe_c(trunk, train_df, groups.to_numpy(), [float(c) for c in args.cv_c.split(",")], params.seed)
        result["cv"] = cv
        probe_c = cv["best"]
    result["probe_c"] = probe_c

    sets = {"val_" + train_task: val_df, **{t: df for t, df in others.items()},
            **{f"rw_{t}": df for t, df in rw.items()}}
    cached = {name: trunk.eval(df) for name, df in sets.items()}
    fitted: dict[str, tuple[Any, float]] = {}
    for method in args.methods.split(","):
        t1 = time.perf_counter()
        det, history = fit_detector(mcfg, cfg, method, views, trunk.start, params.seed, probe_c=probe_c)
        fit_s = time.perf_counter() - t1
        scores = {name: score_frame(det, c, trunk.start, len(sets[name])) for name, c in cached.items()}
        thr = fit_threshold(scores["val_" + train_task], _labels(val_df))
        per = {name: generator_metrics(s, _labels(sets[name]), thr) for name, s in scores.items()}
        result["methods"][method] = {"fit_seconds": fit_s, "threshold": thr, "per_set": per, "history": history}
        fitted[method] = (det, thr)
        log.info("%s: fit %.0fs; %s", method, fit_s,
                 ", ".join(f"{k} {v['ap']:.1f}" for k, v in per.items() if v["ap"] is not None))
        _write(args.out, result, train_task, list(others), list(rw))

    # protocol (c): the fitted detectors on perturbed crops of the unseen generators' val images (a subset)
    pert = perturbations(args.jpeg, args.blur, args.scale)
    robust_frames = {t: robust_subset(df, args.robust_per_class) for t, df in others.items()}
    for method in [m for m in args.robust_methods.split(",") if m in fitted]:
        result["methods"][method]["robustness"] = {t: {} for t in robust_frames}
    if not any("robustness" in e for e in result["methods"].values()):
        return result
    for cond, fn in [("clean", None), *pert.items()]:
        for t, df in robust_frames.items():
            c = trunk.eval(df, None if fn is None else cond, n_crops=1)
            y = _labels(df)
            for method in result["methods"]:
                if "robustness" in result["methods"][method]:
                    det, thr = fitted[method]
                    ap = generator_metrics(score_frame(det, c, trunk.start, len(y)), y, thr)["ap"]
                    result["methods"][method]["robustness"][t][cond] = ap
        log.info("robustness %s done", cond)
        _write(args.out, result, train_task, list(others), list(rw))
    return result


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def render(result: dict[str, Any], train_task: str, others: list[str], rw: list[str]) -> str:
    """The paper's tables: AP and accuracy per generator and their mean, one row per method; robustness."""
    lines = [f"Trained on `{train_task}` train; threshold fitted on `{train_task}` val; probe C = "
             f"{result['probe_c']:g}; trunk of the training views: {result['trunk_train_seconds']:.0f} s.", ""]
    for title, cols in ((f"t2i val, unseen generators (trained on {train_task})", others),
                        ("realworld, every image (test only)", [f"rw_{t}" for t in rw])):
        if not cols:
            continue
        for metric in ("ap", "acc"):
            lines += [f"#### {title}: {metric.upper()}", "",
                      "| method | " + " | ".join(c.removeprefix("rw_") for c in cols) + " | mean | "
                      f"{train_task} val | fit s |",
                      "|---" * (len(cols) + 4) + "|"]
            for m, e in result["methods"].items():
                vals = [e["per_set"][c][metric] for c in cols]
                lines.append(f"| {m} | " + " | ".join(_f(v) for v in vals) + f" | **{_f(_mean(vals))}** | "
                             f"{_f(e['per_set']['val_' + train_task][metric])} | {e['fit_seconds']:.0f} |")
            lines.append("")
    rob = {m: e["robustness"] for m, e in result["methods"].items() if "robustness" in e}
    if rob:
        conds = list(next(iter(next(iter(rob.values())).values())))
        rob = {m: {t: r for t, r in rr.items() if set(conds) <= set(r)} for m, rr in rob.items()}
        lines += ["#### Robustness: mean AP over the unseen t2i generators (subset of val), per perturbation", "",
                  "| method | " + " | ".join(conds) + " |", "|---" * (len(conds) + 1) + "|"]
        for m, r in rob.items():
            lines.append(f"| {m} | " + " | ".join(_f(_mean([r[t][c] for t in r])) for c in conds) + " |")
        lines.append("")
    if "cv" in result:
        lines += ["#### Probe C by grouped CV on the training split (AP, mean over folds)", "",
                  "| C | clean | jpeg75 | blur1 | mean |", "|---|---|---|---|---|"]
        for c, row in result["cv"]["table"].items():
            lines.append(f"| {c} | {_f(row['clean'])} | {_f(row['jpeg75'])} | {_f(row['blur1'])} | "
                         f"{_f(row['mean'])} |")
        lines.append("")
    return "\n".join(lines)


def _write(out: Path, result: dict[str, Any], train_task: str, others: list[str], rw: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "results.md").write_text(render(result, train_task, others, rw) + "\n")


def _overrides(items: list[str]) -> dict[str, Any]:
    from pipelines.cli.settings import parse_overrides

    return parse_overrides(items)


def common_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every t2i detection benchmark takes (:func:`open_inputs` reads them); each adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.realworld.yaml")
    p.add_argument("--t2i", type=Path, required=True, help="manifests of ../shared/data/t2i (lorax data prepare)")
    p.add_argument("--realworld", type=Path, help="manifests of ../shared/data/realworld (test only)")
    p.add_argument("--groups", type=Path, default=Path("../shared/data/t2i/manifest.csv"),
                   help="the t2i manifest.csv (its group column groups the CV folds)")
    p.add_argument("--cache", help="the feature store's folder (default: <cache.dir>/features of --params)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, required=True)
    return p


def run_main(p: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[argparse.Namespace], Any],
             report: str) -> int:
    """Parse, run, and print the markdown ``report`` the run wrote into ``--out`` (the benchmarks' common CLI)."""
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(args)
    print((args.out / report).read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--train-task", default="sd15")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--robust-methods", default="probe,mole")
    p.add_argument("--robust-per-class", type=int, default=30)
    p.add_argument("--jpeg", type=int, nargs="*", default=[90, 75, 50, 30])
    p.add_argument("--blur", type=float, nargs="*", default=[1, 2, 3])
    p.add_argument("--scale", type=float, nargs="*", default=[0.75, 0.5])
    p.add_argument("--cv-c", default="0.01,0.03,0.1,0.3,1", help="probe C grid for grouped CV ('' = detect.probe_c)")
    return run_main(p, argv, run, "results.md")


if __name__ == "__main__":
    raise SystemExit(main())
