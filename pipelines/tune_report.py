"""What ``lorax tune`` leaves: the table printed and written beside the tuned params file (``<P2 stem>.tune.json``
and ``.tune.csv``), the tuned params file itself (the original's text with only the chosen keys changed, comments
kept, loaded and checked before it is written), and one MLflow run holding the table and the chosen values."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lorax.config import ConfigError, load_params, params_to_dict
from lorax.utils.io import write_json, write_text
from pipelines.params_text import set_path
from pipelines.tune import TuneResult, chosen_changes, get_path

log = logging.getLogger(__name__)


def table_frame(result: TuneResult) -> pd.DataFrame:
    rows = result.table()
    df = pd.DataFrame(rows)
    df["folds"] = [" ".join(f"{v:.2f}" for v in r["folds"]) for r in rows]
    return df


def format_table(result: TuneResult) -> str:
    """The table as text: one line per setting, the chosen one marked with '*'."""
    df = table_frame(result)
    pooled = result.metric != "pooled"  # the accuracy beside another metric (coverage's tie-break)
    cells = [[("*" if r["chosen"] else " ")] + [str(r[k]) for k in result.keys]
             + [f"{r['mean']:.2f} +- {r['std']:.2f}", f"{r['bwt']:.2f}"]
             + ([f"{r['pooled']:.2f}" if pd.notna(r["pooled"]) else "-"]
                if pooled else [])
             + [f"{r['seconds']:.0f}", r["folds"]]
             for _, r in df.iterrows()]
    head = ([" "] + result.keys + [f"{result.metric} (fold mean +- std)", "BWT"] + (["pooled"] if pooled else [])
            + ["s/run", "per fold"])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *cells, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *cells]]
    tasks = ", ".join(result.tasks)
    return (f"lorax tune: {result.search} search, {len(df)} settings x {result.folds} grouped folds of the train split "
            f"of {tasks} (val never read)\n" + "\n".join(lines))


def table_files(result: TuneResult, out: Path) -> tuple[Path, Path]:
    """``<out stem>.tune.json`` (search, chosen, the table, every run) and ``.tune.csv`` (the table) beside ``out``."""
    stem = out.with_suffix("")
    doc = {"search": result.search, "metric": result.metric, "tasks": result.tasks, "folds": result.folds,
           "keys": result.keys, "start": result.start, "chosen": result.chosen, "changed": chosen_changes(result),
           "table": result.table(), "runs": [r.__dict__ for r in result.runs], "params": str(out)}
    j = write_json(Path(f"{stem}.tune.json"), doc)
    c = Path(f"{stem}.tune.csv")
    write_text(c, table_frame(result).to_csv(index=False))
    return j, c


def write_tuned_params(params_file: str | Path, out: str | Path, result: TuneResult,
                       overrides: dict[str, Any] | None = None) -> Path:
    """``out`` = the text of ``params_file`` with the chosen keys that differ from the file's own values set (nothing
    else changes); it must load (with the ``-S`` overrides that are not grid keys) and hold the chosen values."""
    src, out = Path(params_file), Path(out)
    lines = src.read_text().splitlines(keepends=True)
    # the file's own values of the grid keys (a -S override of one moved result.start off it), its other -S applied
    kept = {k: v for k, v in (overrides or {}).items() if k not in result.keys}
    own = params_to_dict(load_params(src, kept))
    for k, v in result.chosen.items():
        if get_path(own, k) != v:
            set_path(lines, k, v)
    tmp = out.with_name(out.name + ".tmp")
    write_text(tmp, "".join(lines))
    try:
        loaded = params_to_dict(load_params(tmp, kept))
        wrong = {k: get_path(loaded, k) for k in result.keys if get_path(loaded, k) != result.chosen[k]}
        if wrong:
            raise ConfigError(f"{out}: the edited file holds {wrong}, not the chosen {result.chosen}; edit it by hand")
    except ConfigError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def log_to_mlflow(params, result: TuneResult, files: list[Path], root: str | Path = ".") -> tuple[str, str]:
    """One MLflow run (tag ``lorax.kind: tune``): the settings tuned from and the chosen values (``chosen.<key>``)
    as params, the best setting's figures and each setting's (step = its row) as metrics, the table and the files
    as artifacts. Returns (run id, tracking URI)."""
    from pipelines.tracking.env import environment_tags
    from pipelines.tracking.tracker import Tracker, run_params

    tracker = Tracker(params, root)
    run = tracker.client.create_run(
        tracker.experiment_id, run_name=f"tune-{params.tracking.scenario}-{time.strftime('%m%d-%H%M%S')}",
        tags={"lorax.kind": "tune", "lorax.scenario": params.tracking.scenario, "lorax.search": result.search,
              "lorax.tasks": ",".join(result.tasks), **environment_tags(root)})
    run_id = run.info.run_id
    chosen = {f"chosen.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in result.chosen.items()}
    tracker.log_params(run_id, {**run_params(params), **chosen})
    table = result.table()
    best = next(r for r in table if r["chosen"])
    tracker.log_metrics(run_id, {f"best.{result.metric}": best["mean"], f"best.{result.metric}_std": best["std"],
                                 "best.bwt": best["bwt"], "best.seconds": best["seconds"], "runs": len(result.runs)})
    for i, row in enumerate(table):
        extra = {"cv.pooled": row["pooled"]} if result.metric != "pooled" and row["pooled"] is not None else {}
        tracker.log_metrics(run_id, {f"cv.{result.metric}": row["mean"], "cv.bwt": row["bwt"],
                                     "cv.seconds": row["seconds"], **extra}, step=i)
    tracker.log_table(run_id, table_frame(result), "tune/table.json")
    for f in files:
        tracker.log_artifact(run_id, f, "tune")
    tracker.finish(run_id)
    return run_id, tracker.uri
