"""The steps that publish a trained task: ``register`` (a registry version, the gate, ``champion``) and ``report``
(metrics.json, plots, the stream run's summary). Drivers as in :mod:`pipelines.steps`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lorax.config import Params
from lorax.continual.state import state_hash
from lorax.continual.summary import long_tables, summarize_stream, write_metrics
from lorax.utils.io import read_json, write_json
from pipelines.layout import Layout
from pipelines.steps import _index, _state_info, calibrate_openset, stream_run

log = logging.getLogger(__name__)


def _log_evaluation(tracker, ids: dict[str, Any], task: str, i: int, ev: dict[str, Any], path: Path) -> None:
    """The evaluation column in the task's run, and the per-task curves (``acc.<task>`` at step = tasks trained - 1)
    in the stream's run. Logged at registration, the stage that talks to MLflow anyway."""
    acc = {f"acc.{t}": a for t, a in zip(ev["tasks"], ev["task_acc"], strict=True)}
    tracker.log_metrics(ids["run_id"], {**acc, "mean_acc": ev["mean_acc"], "binary_acc": ev["binary_acc"],
                                        "mean_ap": ev["mean_ap"]}, step=i)
    tracker.log_artifact(ids["run_id"], path, "eval")
    if ids.get("parent_run_id"):
        tracker.log_metrics(ids["parent_run_id"], {**acc, "avg_acc": ev["mean_acc"]}, step=i)


def parent_version(layout: Layout, prev: str) -> int | None:
    """The registry version of the task this one was learned on top of (None for the first task)."""
    rec = layout.registry(prev)
    return read_json(rec).get("version") if rec.is_file() else None


def register_step(params: Params, layout: Layout, task: str, tracker) -> dict[str, Any]:
    """A new version of the registered model after the task; ``champion`` moves only if the gate passes."""
    from pipelines.tracking import model_registry as registry

    i = _index(params, task)
    state = layout.state(task)
    info = _state_info(state)
    ev = read_json(layout.eval(task), f"evaluate task {task} first")
    sid = state_hash(state)
    if ev.get("state_id") != sid:
        raise ValueError(f"{layout.eval(task)} evaluates another state than {state}; re-run the evaluate step")
    calibrate_openset(params, layout, task)
    ids = dict(info.get("tracking") or {})
    run_id = ids.get("run_id")
    if not run_id:  # trained without tracking: give the version a run of its own in the stream
        parent = stream_run(layout, params.stream[task].prev).get("parent_run_id") or tracker.start_stream(params.tasks)
        run_id = tracker.start_task(parent, task, i)
        ids.update(run_id=run_id, parent_run_id=parent)
    _log_evaluation(tracker, ids, task, i, ev, layout.eval(task))
    from pipelines.gate import judge

    rec = registry.register(tracker, task=task, tasks=info["tasks"], state_dir=state, memory_path=layout.memory(task),
                            eval_result=ev, run_id=run_id, state_id=sid, judge=judge(params, layout, task),
                            parent=parent_version(layout, params.stream[task].prev))
    tracker.set_tags(run_id, {"lorax.model_version": rec["version"], "lorax.gate": rec["gate"]})
    tracker.finish(run_id)
    # a stable record of the registration (aliases move later; `lorax models list` shows the current ones)
    record = {k: v for k, v in rec.items() if k not in ("aliases", "registered_now")}
    write_json(layout.registry(task), record)
    return rec


def report_step(params: Params, layout: Layout, tracker=None) -> dict[str, Any]:
    """reports/metrics.json (headline figures) and metrics_details.json (the keys of ``lorax train``), plots for DVC
    and MLflow, the stream run's summary. Returns both files' figures as one dict."""
    import numpy as np

    from lorax.continual.plots import plot_accuracy_matrix, plot_task_curves

    tasks = params.tasks
    evals = [read_json(layout.eval(t), f"evaluate task {t} first") for t in tasks]
    states = [layout.state(t) for t in tasks]
    metrics = summarize_stream(params, evals, states)
    write_metrics(layout.metrics, metrics)
    matrix, curves = long_tables(metrics)
    layout.plots.mkdir(parents=True, exist_ok=True)
    matrix.to_csv(layout.plots / "acc_matrix.csv", index=False)
    curves.to_csv(layout.plots / "acc_curves.csv", index=False)
    R = np.array([[np.nan if v is None else v for v in row] for row in metrics["acc_matrix"]])
    plot_accuracy_matrix(R, tasks, layout.plots / "acc_matrix.png")
    plot_task_curves(R, tasks, layout.plots / "task_curves.png")
    parent = (read_json(layout.stream_file).get("parent_run_id") if layout.stream_file.is_file()
              else (_state_info(states[-1]).get("tracking") or {}).get("parent_run_id"))
    if tracker is not None and parent:
        from pipelines.tracking.env import dvc_lock_hashes, environment_tags

        tracker.require_run(parent, str(layout.stream_file))
        keys = ("aa", "aaf", "bwt", "forgetting", "binary_acc", "mean_ap")
        tracker.log_metrics(parent, {k: metrics[k] for k in keys if metrics.get(k) is not None}, step=len(tasks) - 1)
        import pandas as pd

        table = pd.DataFrame(metrics["acc_matrix"], columns=tasks)
        table.insert(0, "evaluated \\ after", tasks)
        tracker.log_table(parent, table, f"acc_matrix_{len(tasks)}tasks.json")
        for f in ("acc_matrix.png", "task_curves.png", "acc_matrix.csv", "acc_curves.csv"):
            tracker.log_artifact(parent, layout.plots / f, "plots")
        tracker.log_artifact(parent, layout.metrics)
        tracker.log_artifact(parent, layout.metrics_details)
        tracker.log_artifact(parent, layout.root / "dvc.lock", "dvc")
        tracker.log_dict(parent, dvc_lock_hashes(layout.root), "dvc/lock_hashes.json")
        tracker.set_tags(parent, {"lorax.tasks": ",".join(tasks), **environment_tags(layout.root)})
        tracker.finish(parent)
    log.info("report: %s (AA %.2f, AAF %.2f, BWT %.2f)", layout.metrics, metrics["aa"], metrics["aaf"], metrics["bwt"])
    return metrics
