"""A stream's figures from its evaluations: what metrics.json holds (AA, AAF, BWT, forgetting, the accuracy matrix,
the last evaluation's pooled accuracy and binary decision, the controls) and how it is printed and plotted.

On disk the figures are split in two files, so that ``dvc metrics show`` fits a terminal: ``metrics.json`` holds
the scalar headline figures (:data:`HEADLINE_KEYS`), ``metrics_details.json`` beside it everything else (the
accuracy matrix, the tasks, per-task lists, the controls). :func:`read_metrics` reads both back as one dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lorax.continual import metrics as M
from lorax.continual.state import read_info
from lorax.utils.io import write_json

if TYPE_CHECKING:
    from lorax.config import Params


# figures of the last evaluation copied into metrics.json (as is, and under each control)
LAST_EVAL_KEYS = ("pooled_acc", "pooled_acc_argmax", "binary_acc", "balanced_acc", "real_acc", "fake_acc",
                  "verdict_threshold", "binary_acc_fitted", "binary_threshold", "binary_ap", "mean_ap",
                  "set_coverage", "set_size")
# per-task lists of the last evaluation copied into the details (prediction sets: lorax/continual/conformal.py)
LAST_EVAL_LISTS = ("set_coverage_per_task", "set_size_per_task", "set_coverage_per_label")


# metrics.json: scalars only, one column each in `dvc metrics show reports/metrics.json` (~170 characters wide);
# the rest (fake_acc, the times, ...) is in the details file
HEADLINE_KEYS = ("method", "n_tasks", "aa", "aaf", "bwt", "forgetting", "pooled_acc", "binary_acc", "balanced_acc",
                 "real_acc", "mean_ap", "set_coverage", "set_size", "trainable_params")
DETAILS_FILE = "metrics_details.json"


def _stream_figures(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """aa, aaf, bwt, forgetting (from the accuracy matrix), acc_matrix, and the last evaluation's LAST_EVAL_KEYS."""
    R = M.AccuracyMatrix([e["task_acc"] for e in evals])
    last = {k: round(float(evals[-1][k]), 4) for k in LAST_EVAL_KEYS
            if evals[-1].get(k) is not None and np.isfinite(float(evals[-1][k]))}
    last.update({k: [None if v is None or not np.isfinite(v) else round(float(v), 4) for v in evals[-1][k]]
                 for k in LAST_EVAL_LISTS if evals[-1].get(k) is not None})
    return {**{k: round(float(v), 4) for k, v in R.summary().items()}, **last, "acc_matrix": R.to_list()}


def control_figures(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """``{name: figures}`` of each control (``resampled``, ``jpeg<Q>``) that every evaluation of the stream carries."""
    names = set.intersection(*(set(e.get("control") or {}) for e in evals)) if evals else set()
    return {name: _stream_figures([e["control"][name] for e in evals]) for name in sorted(names)}


def summarize_stream(params: Params, evals: list[dict[str, Any]], states: list[Path]) -> dict[str, Any]:
    """metrics.json: aa, aaf, bwt, forgetting, binary_acc, acc_matrix (percent), tasks, parameters, seconds; the
    last evaluation's pooled accuracy and binary decision (LAST_EVAL_KEYS); ``control.resampled.*``: the same
    figures with every evaluated image resampled first, when ``eval.resample_control`` is set; ``set_coverage``
    (%) and ``set_size`` (labels) of the prediction sets, overall and per task (``set_coverage_per_task``, in the
    details), when the model has them."""
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
        "n_tasks": len(info["tasks"]),
        "trainable_params": info["trainable_params_per_task"][-1],  # the last task's
        # trace methods: each task's expert (parameters, seconds of its training forward passes) beside the adapter
        **{k: info[k] for k in ("trace_params_per_task", "trace_forward_seconds_per_task", "adapter_params_per_task")
           if k in info},
    }


def details_path(metrics_path: str | Path) -> Path:
    """The details file beside a metrics.json (``reports/metrics_details.json``, ``OUT/metrics_details.json``)."""
    return Path(metrics_path).with_name(DETAILS_FILE)


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(headline, details)``: the :data:`HEADLINE_KEYS` the dict has, and every other key."""
    head = {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}
    return head, {k: v for k, v in metrics.items() if k not in head}


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``metrics`` as metrics.json (headline) and the details file beside it; returns both paths."""
    head, details = split_metrics(metrics)
    extra = write_json(details_path(path), details)  # first: a metrics.json always has its details beside it
    return write_json(path, head), extra


def read_metrics(path: str | Path) -> dict[str, Any]:
    """metrics.json and its details file as one dict (a metrics.json without a details file: as it is)."""
    head = json.loads(Path(path).read_text())
    extra = details_path(path)
    return {**(json.loads(extra.read_text()) if extra.is_file() else {}), **head}


def format_matrix(metrics: dict[str, Any]) -> str:
    tasks = metrics["tasks"]
    w = max(8, *(len(t) for t in tasks)) + 1
    lines = ["accuracy matrix R[i, j] (%): rows = task evaluated, columns = after training task j",
             " " * w + "".join(f"{t[:w - 1]:>{w}}" for t in tasks)]
    for t, row in zip(tasks, metrics["acc_matrix"], strict=True):
        lines.append(f"{t:<{w}}" + "".join(f"{'' if v is None else f'{v:.1f}':>{w}}" for v in row))
    lines.append(
        f"{metrics['method']}: AA {metrics['aa']:.2f}  AAF {metrics['aaf']:.2f}  BWT {metrics['bwt']:.2f}  "
        f"binary {metrics['binary_acc']:.2f}  balanced {metrics.get('balanced_acc', float('nan')):.2f}  "
        f"real called real {metrics.get('real_acc', float('nan')):.2f}  trainable/task {metrics['trainable_params_per_task']}  "
        f"backbone {metrics['backbone_params']}"
    )
    return "\n".join(lines)


def long_tables(metrics: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The accuracy matrix as long tables for DVC plots: one row per cell, and per-task curves plus their mean."""
    tasks, R = metrics["tasks"], metrics["acc_matrix"]
    rows = [{"task": t, "row": i, "after_task": tasks[j], "step": j, "acc": R[i][j]}
            for i, t in enumerate(tasks) for j in range(len(tasks)) if R[i][j] is not None]
    matrix = pd.DataFrame(rows)
    curves = matrix.drop(columns="row").sort_values(["task", "step"], kind="stable").reset_index(drop=True)
    mean = pd.DataFrame([{"task": "mean", "after_task": tasks[j], "step": j,
                          "acc": sum(R[i][j] for i in range(j + 1)) / (j + 1)} for j in range(len(tasks))])
    return matrix, pd.concat([curves, mean], ignore_index=True)
