"""CLIP-MoLE protocol (b), leave one generator out on t2i, and "trained on every t2i generator, tested on the
real-world set": ``python -m benchmarks.detect_t2i_logo``.

(b): for each t2i generator in turn, train on the other six generators' train splits, fit the threshold on their
val splits, report AP and accuracy on the held-out generator's val split. (all): train on all seven train splits,
threshold on their val splits, report on every image of each ``--realworld`` generator (test only).

Training images are read as their fixed evaluation crop (``detect.eval_crops``, the centre at 1), without
augmentation, so the trunk outputs are shared with the scoring of the same images; methods: the probe (logistic
regression, C by grouped CV over the training generators' train splits: groups = prompt, scored by AP) and, with
``--methods``, adapted ones trained on the same crops for ``detect.epochs``. Writes ``OUT/logo.json`` and ``OUT/logo.md``.
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

from benchmarks.detect_t2i import _f, _features, _labels, _mean, _split, common_parser, open_inputs, run_main
from lorax.detect.evaluate import fit_threshold, generator_metrics
from lorax.detect.fixed_views import fit_detector, score_frame
from lorax.detect.trunk import CachedSet

log = logging.getLogger("detect_t2i_logo")


def _cat(sets: list[CachedSet], offsets: list[int]) -> CachedSet:
    return CachedSet(torch.cat([s.tokens for s in sets]), torch.cat([s.pre for s in sets]),
                     np.concatenate([s.labels for s in sets]),
                     np.concatenate([s.rows + o for s, o in zip(sets, offsets, strict=True)]))


def _cv_c(feats: np.ndarray, y: np.ndarray, groups: np.ndarray, rows: np.ndarray, cs: list[float]) -> float:
    best, best_ap = cs[0], -1.0
    for c in cs:
        aps = []
        for tr, te in GroupKFold(n_splits=4).split(feats, y, groups):
            mu, sd = feats[tr].mean(0), feats[tr].std(0) + 1e-6
            lr = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit((feats[tr] - mu) / sd, y[tr])
            aps.append(average_precision_score(y[te], lr.decision_function((feats[te] - mu) / sd)))
        if np.mean(aps) > best_ap:
            best, best_ap = c, float(np.mean(aps))
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    params, trunk, t2i, rw = open_inputs(args)
    cfg, mcfg = params.detect, params.model
    gm = pd.read_csv(args.groups, usecols=["path", "group"])
    gmap = dict(zip(gm["path"], gm["group"], strict=True))
    tasks = list(t2i)
    train = {t: _split(df, "train") for t, df in t2i.items()}
    val = {t: _split(df, "val") for t, df in t2i.items()}
    t0 = time.perf_counter()
    tr_c = {t: trunk.eval(df) for t, df in train.items()}
    val_c = {t: trunk.eval(df) for t, df in val.items()}
    rw_c = {t: trunk.eval(df) for t, df in rw.items()}
    result: dict[str, Any] = {"command": "python -m benchmarks.detect_t2i_logo " + shlex.join(sys.argv[1:]),
                              "trunk_seconds": time.perf_counter() - t0, "logo": {}, "all": {}}
    cs = [float(c) for c in args.cv_c.split(",")]

    feats: dict[str, dict[str, np.ndarray]] = {}

    def feat(kind: str, t: str) -> np.ndarray:  # frozen features, once per set
        src = {"train": tr_c, "val": val_c, "rw": rw_c}[kind]
        if t not in feats.setdefault(kind, {}):
            feats[kind][t] = _features(trunk, src[t])
        return feats[kind][t]

    def probe(train_tasks: list[str]) -> tuple[Callable[[str, str], np.ndarray], float, float]:
        """The probe in feature space (one crop per image, so a crop's logit is the image's)."""
        x = np.concatenate([feat("train", t) for t in train_tasks])
        y = np.concatenate([_labels(train[t]) for t in train_tasks])
        groups = np.concatenate([train[t]["path"].map(gmap).fillna(train[t]["path"]).to_numpy()
                                 for t in train_tasks])
        c = _cv_c(x, y, groups, np.arange(len(y)), cs)
        mu, sd = x.mean(0), x.std(0) + 1e-6
        lr = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit((x - mu) / sd, y)

        def score(kind: str, t: str) -> np.ndarray:
            return 1 / (1 + np.exp(-lr.decision_function((feat(kind, t) - mu) / sd)))

        vs = np.concatenate([score("val", t) for t in train_tasks])
        vy = np.concatenate([_labels(val[t]) for t in train_tasks])
        return score, fit_threshold(vs, vy), c

    def fit(train_tasks: list[str], method: str) -> tuple[Any, float, float]:
        sets = [tr_c[t] for t in train_tasks]
        offsets = list(np.cumsum([0] + [len(train[t]) for t in train_tasks[:-1]]))
        cached = _cat(sets, offsets)
        feats = _features(trunk, cached)
        groups = np.concatenate([train[t]["path"].map(gmap).fillna(train[t]["path"]).to_numpy()
                                 for t in train_tasks])
        c = _cv_c(feats, cached.labels, groups, cached.rows, cs)
        det, _ = fit_detector(mcfg, cfg, method, cached, trunk.start, params.seed, probe_c=c)
        vdf = pd.concat([val[t] for t in train_tasks], ignore_index=True)
        vs = np.concatenate([score_frame(det, val_c[t], trunk.start, len(val[t])) for t in train_tasks])
        return det, fit_threshold(vs, _labels(vdf)), c

    def scorer(train_tasks: list[str], method: str) -> tuple[Callable[[str, str], np.ndarray], float, float]:
        if method == "probe":
            return probe(train_tasks)
        det, thr, c = fit(train_tasks, method)
        src = {"val": (val_c, val), "rw": (rw_c, rw)}
        return (lambda kind, t: score_frame(det, src[kind][0][t], trunk.start, len(src[kind][1][t]))), thr, c

    for method in args.methods.split(","):
        if args.logo:
            res = {}
            for held in tasks:
                score, thr, c = scorer([t for t in tasks if t != held], method)
                res[held] = generator_metrics(score("val", held), _labels(val[held]), thr) | {"c": c}
                log.info("%s LOGO %s: AP %.1f", method, held, res[held]["ap"])
            result["logo"][method] = res
        if rw:
            score, thr, c = scorer(tasks, method)
            result["all"][method] = {t: generator_metrics(score("rw", t), _labels(rw[t]), thr) for t in rw} | {"c": c}
            log.info("%s all-t2i -> realworld: %s", method,
                     {t: round(v["ap"], 1) for t, v in result["all"][method].items() if isinstance(v, dict)})
        _write(args.out, result, tasks, list(rw))
    return result


def render(result: dict[str, Any], tasks: list[str], rw: list[str]) -> str:
    lines = []
    for title, key, cols in (("(b) leave one t2i generator out: trained on the other six", "logo", tasks),
                             ("trained on all seven t2i train splits, tested on realworld (every image)", "all", rw)):
        if not result[key]:
            continue
        for metric in ("ap", "acc"):
            lines += [f"#### {title}: {metric.upper()}", "", "| method | " + " | ".join(cols) + " | mean |",
                      "|---" * (len(cols) + 2) + "|"]
            for m, res in result[key].items():
                vals = [res[c][metric] for c in cols]
                lines.append(f"| {m} | " + " | ".join(_f(v) for v in vals) + f" | **{_f(_mean(vals))}** |")
            lines.append("")
    return "\n".join(lines)


def _write(out: Path, result: dict[str, Any], tasks: list[str], rw: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "logo.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "logo.md").write_text(render(result, tasks, rw) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="probe")
    p.add_argument("--no-logo", dest="logo", action="store_false", help="skip protocol (b)")
    p.add_argument("--cv-c", default="0.01,0.03,0.1,0.3,1")
    return run_main(p, argv, run, "logo.md")


if __name__ == "__main__":
    raise SystemExit(main())
