"""A whole stream in one process: for each task, train -> select exemplars -> evaluate; then the summary.

This is ``lorax train``. Each finished task leaves ``OUT/state/<task>`` (model), ``OUT/memory/<task>.parquet`` and
``OUT/eval/<task>.json`` (one column of the accuracy matrix); a re-run skips the tasks already complete and resumes
an interrupted one from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lorax.config import Params
from lorax.continual import metrics as M
from lorax.continual.memory import ExemplarMemory
from lorax.continual.state import is_state, load_state, read_info
from lorax.data.manifest import load_stream_manifests
from lorax.utils.io import write_json

log = logging.getLogger(__name__)


def state_dir(out: Path, task: str) -> Path:
    return out / "state" / task


def memory_path(out: Path, task: str) -> Path:
    return out / "memory" / f"{task}.parquet"


def eval_path(out: Path, task: str) -> Path:
    return out / "eval" / f"{task}.json"




def run_task_steps(
    params: Params,
    manifests: dict[str, pd.DataFrame],
    task: str,
    prev_state: Path | None,
    prev_memory: Path | None,
    state_out: Path,
    memory_out: Path,
    eval_out: Path,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    store: Any = None,
) -> dict[str, Any]:
    """Train, select exemplars and evaluate one task; each output is skipped when already complete.

    ``store``: an :class:`~lorax.continual.embedding_store.EmbeddingStore` for selection and evaluation."""
    from lorax.continual.trainer import evaluate_task_list, select_exemplars, train_task  # the model stack: only here

    tasks = list(manifests)
    i = tasks.index(task)
    if not is_state(state_out) or read_info(state_out).get("tasks") != tasks[: i + 1]:
        memory = ExemplarMemory.load(prev_memory) if prev_memory is not None and prev_memory.is_file() else None
        history = [manifests[t] for t in tasks[:i]]
        train_task(prev_state, manifests[task], memory, params, state_out, history=history, callback=callback,
                   store=store)
    method = None
    if not memory_out.is_file():
        method, _ = load_state(state_out, params=params)
        memory = ExemplarMemory.load(prev_memory) if prev_memory is not None and prev_memory.is_file() else None
        select_exemplars(method, manifests[task], memory, params, store=store).save(memory_out)
    if not eval_out.is_file():
        method = method or load_state(state_out, params=params)[0]
        result, table = evaluate_task_list(method, [manifests[t] for t in tasks[: i + 1]], params, store=store)
        result["task"] = task
        result["tasks"] = tasks[: i + 1]
        write_json(eval_out, result)
        table.to_csv(eval_out.with_suffix(".predictions.csv"), index=False)
    result = json.loads(eval_out.read_text())
    if params.eval.resample_control is not None and "resampled" not in (result.get("control") or {}):
        # a finished task evaluated before the control was switched on: add the control, keep the rest
        from lorax.continual.trainer import evaluate_controls, val_rows

        method = method or load_state(state_out, params=params)[0]
        val = val_rows([manifests[t] for t in tasks[: i + 1]])
        result["control"] = {**(result.get("control") or {}), **evaluate_controls(method, val, params, store=store)}
        write_json(eval_out, result)
    return result


# figures of the last evaluation copied into metrics.json (as is, and under each control)
LAST_EVAL_KEYS = ("pooled_acc", "binary_acc", "binary_acc_fitted", "binary_threshold", "binary_ap", "mean_ap")


def _stream_figures(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """aa, aaf, bwt, forgetting (from the accuracy matrix), acc_matrix, and the last evaluation's LAST_EVAL_KEYS."""
    R = M.AccuracyMatrix([e["task_acc"] for e in evals])
    last = {k: round(float(evals[-1][k]), 4) for k in LAST_EVAL_KEYS if evals[-1].get(k) is not None}
    return {**{k: round(float(v), 4) for k, v in R.summary().items()}, **last, "acc_matrix": R.to_list()}


def control_figures(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"resampled": figures}`` when every evaluation of the stream carries that control (``eval.resample_control``)."""
    names = set.intersection(*(set(e.get("control") or {}) for e in evals)) if evals else set()
    return {name: _stream_figures([e["control"][name] for e in evals]) for name in sorted(names)}


def summarize_stream(params: Params, evals: list[dict[str, Any]], states: list[Path]) -> dict[str, Any]:
    """metrics.json: aa, aaf, bwt, forgetting, binary_acc, acc_matrix (percent), tasks, parameters, seconds; the
    last evaluation's pooled accuracy and binary decision (LAST_EVAL_KEYS); ``control.resampled.*``: the same
    figures with every evaluated image resampled first, when ``eval.resample_control`` is set."""
    info = read_info(states[-1])
    figures = _stream_figures(evals)
    control = control_figures(evals)
    return {
        "method": info["method"],
        **figures,
        "binary_acc": round(float(evals[-1]["binary_acc"]), 4),
        "mean_ap": evals[-1].get("mean_ap"),
        **({"control": control} if control else {}),
        "tasks": info["tasks"],
        "trainable_params_per_task": info["trainable_params_per_task"],
        "backbone_params": info["backbone_params"],
        "backbone_pretrained": info.get("backbone_pretrained", False),
        "seconds_per_task": info["seconds_per_task"],
        "final_task_acc": evals[-1]["task_acc"],
    }


def format_matrix(metrics: dict[str, Any]) -> str:
    tasks = metrics["tasks"]
    w = max(8, *(len(t) for t in tasks)) + 1
    lines = ["accuracy matrix R[i, j] (%): rows = task evaluated, columns = after training task j",
             " " * w + "".join(f"{t[:w - 1]:>{w}}" for t in tasks)]
    for t, row in zip(tasks, metrics["acc_matrix"], strict=True):
        lines.append(f"{t:<{w}}" + "".join(f"{'' if v is None else f'{v:.1f}':>{w}}" for v in row))
    lines.append(
        f"{metrics['method']}: AA {metrics['aa']:.2f}  AAF {metrics['aaf']:.2f}  BWT {metrics['bwt']:.2f}  "
        f"binary {metrics['binary_acc']:.2f}  trainable/task {metrics['trainable_params_per_task']}  "
        f"backbone {metrics['backbone_params']}"
    )
    return "\n".join(lines)


def run_stream(params: Params, manifests_dir: str | Path, out: str | Path,
               callback: Callable[[str, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train the whole stream of ``params`` (resuming finished tasks) and write ``OUT/metrics.json``."""
    out = Path(out)
    tasks = params.tasks
    manifests = load_stream_manifests(manifests_dir, tasks)
    evals, states = [], []
    prev_state = prev_memory = None
    from lorax.continual.embedding_store import EmbeddingStore

    store = EmbeddingStore.from_params(params, out)  # under the output folder here (the project root in the pipeline)
    for task in tasks:
        log.info("=== task %d/%d: %s (%s) ===", tasks.index(task) + 1, len(tasks), task, params.continual.method)
        cb = (lambda e, row, _t=task: callback(_t, e, row)) if callback else None
        evals.append(run_task_steps(params, manifests, task, prev_state, prev_memory, state_dir(out, task),
                                    memory_path(out, task), eval_path(out, task), cb, store))
        states.append(state_dir(out, task))
        prev_state, prev_memory = state_dir(out, task), memory_path(out, task)
    metrics = summarize_stream(params, evals, states)
    write_json(out / "metrics.json", metrics)
    from lorax.continual.plots import plot_accuracy_matrix, plot_task_curves

    R = np.array([[np.nan if v is None else v for v in row] for row in metrics["acc_matrix"]])
    plot_accuracy_matrix(R, tasks, out / "acc_matrix.png")
    plot_task_curves(R, tasks, out / "task_curves.png")
    return metrics
