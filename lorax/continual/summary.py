"""A stream's figures from its evaluations: what metrics.json holds (AA, AAF, BWT, forgetting, the accuracy matrix,
the last evaluation's pooled accuracy and binary decision, the controls) and how it is printed and plotted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lorax.continual import metrics as M
from lorax.continual.state import read_info

if TYPE_CHECKING:
    from lorax.config import Params


# figures of the last evaluation copied into metrics.json (as is, and under each control)
LAST_EVAL_KEYS = ("pooled_acc", "pooled_acc_argmax", "binary_acc", "balanced_acc", "real_acc", "fake_acc",
                  "verdict_threshold", "binary_acc_fitted", "binary_threshold", "binary_ap", "mean_ap")


def _stream_figures(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """aa, aaf, bwt, forgetting (from the accuracy matrix), acc_matrix, and the last evaluation's LAST_EVAL_KEYS."""
    R = M.AccuracyMatrix([e["task_acc"] for e in evals])
    last = {k: round(float(evals[-1][k]), 4) for k in LAST_EVAL_KEYS
            if evals[-1].get(k) is not None and np.isfinite(float(evals[-1][k]))}
    return {**{k: round(float(v), 4) for k, v in R.summary().items()}, **last, "acc_matrix": R.to_list()}


def control_figures(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """``{name: figures}`` of each control (``resampled``, ``jpeg<Q>``) that every evaluation of the stream carries."""
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
