"""``lorax tune``: settings chosen on the user's own data by grouped cross-validation on the train split.

The train rows of the stream's first ``tune.tasks`` tasks are cut into ``tune.folds`` grouped folds
(:func:`lorax.data.folds.train_folds`; the validation split is dropped before anything else and never read). Each
fold is written as manifests whose ``val`` rows are the fold's held-out train rows, and every candidate setting runs
the very stream ``lorax train`` runs (:func:`pipelines.train_stream.run_stream`) on each fold, in its own folder
under the work folder, with the shared feature store (``cache:``) so trunk work is reused across candidates. The
search is the grid's full product when it is small (``tune.search``, ``tune.max_runs``), else one key at a time
from the params' own values. :mod:`pipelines.tune_report` prints the table, writes it and the tuned params file and
logs them to MLflow.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorax.config import ConfigError, Params, params_to_dict, parse_params, set_by_path
from lorax.data.folds import folds_digest, train_folds
from lorax.data.manifest import load_stream_manifests, manifest_path, write_manifest
from lorax.features import cache_root as cache_folder
from lorax.tune_config import METRIC_KEYS
from lorax.utils.io import read_json, write_json

log = logging.getLogger(__name__)
RUN_FILE = "tune_run.json"  # in each run's folder: its figures, so a re-run of `lorax tune` reuses it


@dataclass
class Run:
    """One candidate setting on one fold."""

    setting: dict[str, Any]
    fold: int
    metric: float
    bwt: float
    seconds: float
    out: str
    pooled: float | None = None  # the fold's pooled accuracy (the tie-break of tune.metric coverage)


@dataclass
class TuneResult:
    search: str  # product | coordinate
    keys: list[str]
    start: dict[str, Any]  # the params' own values of the grid keys
    runs: list[Run] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    folds: int = 0
    metric: str = "pooled"

    def table(self) -> list[dict[str, Any]]:
        """One row per evaluated setting, in the order they ran: the values, the metric's fold mean and std, mean
        BWT, pooled accuracy and seconds per fold run, and each fold's metric."""
        rows: dict[str, dict[str, Any]] = {}
        for r in self.runs:
            rows.setdefault(setting_key(r.setting), {"setting": r.setting, "runs": []})["runs"].append(r)
        out = []
        for row in rows.values():
            runs = sorted(row["runs"], key=lambda r: r.fold)
            m = np.array([r.metric for r in runs], dtype=float)
            out.append({**row["setting"], "mean": round(float(m.mean()), 2),
                        "std": round(float(m.std(ddof=1)) if len(m) > 1 else 0.0, 2),
                        "bwt": round(float(np.mean([r.bwt for r in runs])), 2),
                        "pooled": (round(float(np.mean([r.pooled for r in runs])), 2)
                                   if all(r.pooled is not None for r in runs) else None),
                        "seconds": round(float(np.mean([r.seconds for r in runs])), 1),
                        "folds": [round(r.metric, 2) for r in runs],
                        "chosen": row["setting"] == self.chosen})
        return out


def setting_key(setting: dict[str, Any]) -> str:
    return json.dumps(setting, sort_keys=True, default=str)


def get_path(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def fold_metric(params: Params, metrics: dict[str, Any]) -> float:
    """The figure ``tune.metric`` reads from one fold run's metrics (higher is better).

    ``coverage`` scores the prediction sets where they fail: an old generator whose label is under-covered. Each
    task's held-out coverage counts up to the target (``continual.set_coverage``) and no further, so a setting that
    covers one task at 99% cannot buy back another at 80%; the mean over the tasks is the target exactly when every
    task reaches it. Settings that all reach it tie, and the tie goes to the more accurate (``Search.score``)."""
    name = params.tune.metric
    if name != "coverage":
        return float(metrics[METRIC_KEYS[name]])
    per_task = [float(c) for c in metrics.get("set_coverage_per_task") or [] if c is not None and c == c]
    if not per_task:
        raise ValueError("tune.metric coverage: the fold run wrote no set_coverage_per_task (prediction sets off?)")
    target = 100.0 * float(params.continual.set_coverage or 0.0)
    return float(np.mean([min(c, target) for c in per_task]))


def tuned_tasks(params: Params) -> list[str]:
    return params.tasks[: params.tune.tasks]


def search_mode(params: Params) -> str:
    n = int(np.prod([len(v) for v in params.tune.grid.values()]))
    if params.tune.search != "auto":
        return params.tune.search
    return "product" if n <= params.tune.max_runs else "coordinate"


# evaluations that do not enter the tuned metric: off in the tuning runs (about a third of a realworld run's time)
# unless the grid names them
UNSCORED = {"eval.resample_control": None, "eval.jpeg_control": None}


def base_settings(params: Params, cache_root: str | Path = ".") -> dict[str, Any]:
    """The raw settings every run starts from: ``params`` with the stream cut to the tuned tasks, the shortcut
    controls off (:data:`UNSCORED`) and the feature store at one absolute folder (the cache folder of
    :func:`lorax.features.cache_root`; relative: from ``cache_root``), shared by all runs."""
    raw = params_to_dict(params)
    tasks = tuned_tasks(params)
    raw["stream"] = {t: {"prev": "init" if i == 0 else tasks[i - 1]} for i, t in enumerate(tasks)}
    for k, v in UNSCORED.items():
        if k not in params.tune.grid:
            set_by_path(raw, k, v)
    raw["cache"]["dir"] = str(cache_folder(params.cache, cache_root).resolve())
    return raw


def settings_for(base: dict[str, Any], setting: dict[str, Any]) -> Params:
    raw = copy.deepcopy(base)
    for k, v in setting.items():
        set_by_path(raw, k, v)
    try:
        return parse_params(raw, "the tuned settings")
    except ConfigError as e:
        label = ", ".join(f"{k}={v}" for k, v in setting.items())
        raise ConfigError(f"tune.grid: the candidate {label} does not load: {e}") from None


def write_folds(params: Params, manifests: str | Path, work: Path) -> tuple[list[Path], str]:
    """The folds' manifests under ``work/folds-<digest>/fold<k>/`` (one per fold); returns them and the digest."""
    tasks = tuned_tasks(params)
    missing = [t for t in tasks if not manifest_path(manifests, t).is_file()]
    if missing:
        raise FileNotFoundError(f"{manifests}: no manifest for {missing}; run `lorax data prepare` first (tune never "
                                f"prepares: preparing reads the validation images)")
    data_root = Path(params.data.root).resolve()
    loaded = load_stream_manifests(manifests, tasks, data_root)
    folds = train_folds(loaded, params.tune.folds, params.seed)
    digest = folds_digest(folds)
    dirs = []
    for f, fold in enumerate(folds):
        d = work / f"folds-{digest}" / f"fold{f}"
        for t, rows in fold.items():
            if not manifest_path(d, t).is_file():
                write_manifest(rows, manifest_path(d, t), data_root)
        dirs.append(d)
    sizes = {t: (int((m["split"] == "train").sum()), int((m["split"] == "val").sum())) for t, m in folds[0].items()}
    log.info("tune: %d grouped folds of the train split of %s (fold 1 train/held-out rows: %s); val not read",
             len(folds), tasks, sizes)
    return dirs, digest


def run_name(setting: dict[str, Any], run_params: Params, digest: str) -> str:
    label = "_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in setting.items())
    label = re.sub(r"[^\w.=-]+", "", label)[:60] or "params"
    raw = params_to_dict(run_params)
    raw.pop("cache", None)
    h = hashlib.sha256((json.dumps(raw, sort_keys=True, default=str) + digest).encode()).hexdigest()[:8]
    return f"{label}-{h}"


class Search:
    """Runs settings on every fold (each once: a setting asked again, or left by an earlier `lorax tune` in the
    same work folder, is read back)."""

    def __init__(self, params: Params, fold_dirs: list[Path], digest: str, work: Path, cache_root: str | Path,
                 run_stream: Callable[..., dict[str, Any]], total: int | None = None) -> None:
        self.params, self.fold_dirs, self.digest, self.work = params, fold_dirs, digest, work
        self.base = base_settings(params, cache_root)
        self.run_stream = run_stream
        self.done: dict[str, list[Run]] = {}
        self.total = total
        self.n = 0

    def check(self, settings: list[dict[str, Any]]) -> None:
        """Every candidate loads (a bad value fails before any training)."""
        for s in settings:
            settings_for(self.base, s)

    def evaluate(self, setting: dict[str, Any]) -> list[Run]:
        key = setting_key(setting)
        if key in self.done:
            return self.done[key]
        p = settings_for(self.base, setting)
        name = run_name(setting, p, self.digest)
        runs = []
        k = len(self.fold_dirs)
        self.n += 1
        for f, fold_dir in enumerate(self.fold_dirs):
            out = self.work / "runs" / name / f"fold{f}"
            what = (f"tune {self.n}{f'/{self.total}' if self.total else ''}: "
                    f"{', '.join(f'{a}={b}' for a, b in setting.items())} fold {f + 1}/{k}")
            record = out / RUN_FILE
            if record.is_file():
                run = Run(**read_json(record))
                log.info("%s: %s %.2f, BWT %.2f (%.0f s; from %s)", what, self.params.tune.metric, run.metric,
                         run.bwt, run.seconds, out)
            else:
                log.info("%s ...", what)
                t0 = time.perf_counter()
                metrics = self.run_stream(p, fold_dir, out)
                run = Run(setting=dict(setting), fold=f, metric=fold_metric(p, metrics),
                          bwt=float(metrics.get("bwt") or 0.0), seconds=round(time.perf_counter() - t0, 1),
                          out=str(out),
                          pooled=None if metrics.get("pooled_acc") is None else float(metrics["pooled_acc"]))
                write_json(record, run.__dict__)
                log.info("%s: %s %.2f, BWT %.2f, %.0f s", what, self.params.tune.metric, run.metric, run.bwt,
                         run.seconds)
            runs.append(run)
        self.done[key] = runs
        return runs

    def score(self, setting: dict[str, Any]) -> tuple[float, ...]:
        """What is maximised: (the metric's fold mean to 0.01, minus mean seconds): ties go to the faster. With
        ``tune.metric: coverage`` the fold mean of pooled accuracy comes between the two: of the settings whose sets
        reach the target, the more accurate."""
        runs = self.evaluate(setting)
        metric = round(float(np.mean([r.metric for r in runs])), 2)
        seconds = -float(np.mean([r.seconds for r in runs]))
        if self.params.tune.metric != "coverage":
            return (metric, seconds)
        pooled = [r.pooled for r in runs if r.pooled is not None]
        return (metric, round(float(np.mean(pooled)), 2) if pooled else float("-inf"), seconds)


def tune(params: Params, manifests: str | Path, work: str | Path, cache_root: str | Path = ".",
         run_stream: Callable[..., dict[str, Any]] | None = None) -> TuneResult:
    """Search ``params.tune.grid`` on grouped folds of the train split; the best setting is ``result.chosen``."""
    if params.tune.metric == "coverage" and not params.continual.set_coverage:
        raise ConfigError("tune.metric coverage scores the prediction sets, but continual.set_coverage is off; set "
                          "it (e.g. -S continual.set_coverage=0.9) or tune another metric")
    if run_stream is None:
        from pipelines.train_stream import run_stream
    work = Path(work)
    grid = params.tune.grid
    keys = list(grid)
    start = {k: get_path(params_to_dict(params), k) for k in keys}
    mode = search_mode(params)
    product = [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
    coordinate = [start] + [{**start, k: v} for k in keys for v in grid[k] if v != start[k]]
    todo = product if mode == "product" else coordinate
    total = len(todo) if mode == "product" else None
    fold_dirs, digest = write_folds(params, manifests, work)
    search = Search(params, fold_dirs, digest, work, cache_root, run_stream, total)
    search.check(todo)  # every candidate value loads, before any training
    log.info("tune: %s search over %s (%d settings x %d folds%s), metric %s", mode, keys, len(todo), len(fold_dirs),
             "" if mode == "product" else " at most; each key from the params' own values", params.tune.metric)
    if mode == "product":
        best = max(product, key=search.score)
    else:
        best = dict(start)
        for k in keys:
            options = [{**best, k: v} for v in [best[k], *[v for v in grid[k] if v != best[k]]]]
            best = max(options, key=search.score)
    result = TuneResult(search=mode, keys=keys, start=start, chosen=best, tasks=tuned_tasks(params),
                        folds=len(fold_dirs), metric=params.tune.metric)
    result.runs = [r for runs in search.done.values() for r in runs]
    return result


def chosen_changes(result: TuneResult) -> dict[str, Any]:
    """The chosen values that differ from the params' own."""
    return {k: v for k, v in result.chosen.items() if result.start.get(k) != v}

