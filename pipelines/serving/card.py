"""Model card of a state: a short generated report (markdown + PNGs) that travels with each registered version.

``write_model_card(state_dir, metrics, out_dir)`` takes whatever metrics are at hand, either the stream summary
(``metrics.json`` with its details file, :func:`lorax.continual.summary.read_metrics`: ``acc_matrix``, ``aa``,
``aaf``, ``bwt``, ``final_task_acc``, ...) or one task's evaluation
(``reports/eval/<task>.json``: ``task_acc``, ``confusion``, ``binary_acc``, ...) or both merged, and fills gaps
from the evaluations saved next to the state (``lorax train`` output ``OUT/eval/<task>.json`` or the pipeline's
``reports/eval/<task>.json``), so a card written at registration time already has the accuracy matrix of the
tasks so far.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lorax.continual import metrics as M
from lorax.continual.state import read_info
from lorax.continual.metrics import class_names

log = logging.getLogger(__name__)

CARD_FILE = "model_card.md"
N_FAILURES = 3


def _eval_dirs(state_dir: Path) -> list[Path]:
    """Where evaluations of the states of this stream live: OUT/eval (lorax train), ROOT/reports/eval (pipeline)."""
    root = state_dir.resolve().parent.parent
    return [root / "eval", root / "reports" / "eval"]


def find_evals(state_dir: str | Path, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Saved evaluation results of the stream's states after each of ``tasks`` (those that exist)."""
    out = {}
    for d in _eval_dirs(Path(state_dir)):
        for t in tasks:
            f = d / f"{t}.json"
            if t not in out and f.is_file():
                try:
                    out[t] = json.loads(f.read_text())
                except json.JSONDecodeError:
                    log.warning("%s: not valid JSON; left out of the model card", f)
    return out


def _acc_matrix(metrics: dict[str, Any], tasks: list[str], evals: dict[str, dict[str, Any]]) -> np.ndarray | None:
    R = metrics.get("acc_matrix")
    if R is not None and len(R) == len(tasks):
        return np.array([[np.nan if v is None else float(v) for v in row] for row in R])
    R = np.full((len(tasks), len(tasks)), np.nan)
    for j, t in enumerate(tasks):
        col = (metrics.get("task_acc") if j == len(tasks) - 1 and metrics.get("task_acc") else None) \
            or evals.get(t, {}).get("task_acc")
        if col is None or len(col) != j + 1:
            return None
        R[: j + 1, j] = col
    return R


def _final_acc(metrics: dict[str, Any], R: np.ndarray | None, n: int) -> list[float] | None:
    for key in ("final_task_acc", "task_acc"):
        v = metrics.get(key)
        if v is not None and len(v) == n:
            return [float(a) for a in v]
    return [float(a) for a in R[:, -1]] if R is not None else None


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)


def _failures(tasks: list[str], acc: list[float] | None, cm: np.ndarray | None) -> list[str]:
    """The lowest-accuracy tasks and, from the confusion matrix, where their images go."""
    if acc is None:
        return ["No per-task accuracies were given, so no failure cases can be named."]
    names = class_names(tasks)
    lines = []
    for i in np.argsort(acc, kind="stable")[:N_FAILURES]:
        line = f"- **{tasks[i]}**: {acc[i]:.1f}% (multi-real accuracy on its validation images)"
        if cm is not None and cm.shape[0] >= 2 * len(tasks):
            fake_row = cm[2 * i + 1]
            total = int(fake_row.sum())
            wrong = [(int(fake_row[c]), names[c]) for c in range(len(fake_row)) if c != 2 * i + 1 and fake_row[c]]
            real_row = cm[2 * i]
            real_as_fake = int(real_row[1::2].sum())
            parts = []
            if total:
                top = sorted(wrong, reverse=True)[:2]
                if top:
                    parts.append("its fakes were taken for " + ", ".join(f"{nm} ({k} of {total})" for k, nm in top))
            if real_row.sum():
                parts.append(f"{real_as_fake} of {int(real_row.sum())} of its real images were called fake")
            if parts:
                line += "; " + "; ".join(parts)
        lines.append(line)
    return lines


def write_model_card(state_dir: str | Path, metrics: dict[str, Any] | None, out_dir: str | Path) -> Path:
    """Write ``out_dir/model_card.md`` (+ ``acc_matrix.png``, ``confusion.png`` when the data exist); returns
    the markdown path. ``metrics`` may be empty: the card then uses the evaluations saved next to the state."""
    from lorax.continual.plots import plot_accuracy_matrix, plot_confusion

    state_dir, out_dir = Path(state_dir), Path(out_dir)
    info = read_info(state_dir)
    metrics = dict(metrics or {})
    tasks = list(info["tasks"])
    if metrics.get("tasks") and list(metrics["tasks"]) != tasks:
        raise ValueError(f"metrics are for tasks {metrics['tasks']} but {state_dir} holds {tasks}; pass the metrics "
                         "of this state")
    evals = find_evals(state_dir, tasks)
    last = evals.get(tasks[-1], {})
    out_dir.mkdir(parents=True, exist_ok=True)
    p = info.get("params", {})
    R = _acc_matrix(metrics, tasks, evals)
    acc = _final_acc(metrics, R, len(tasks)) or last.get("task_acc")
    cm = metrics.get("confusion") or last.get("confusion")
    cm = np.asarray(cm, dtype=np.int64) if cm is not None else None
    summary = {}
    if R is not None and np.isfinite(R[np.triu_indices(len(tasks))]).all():
        summary = M.summarize(R)
    for k in ("aa", "aaf", "bwt", "forgetting", "binary_acc", "mean_ap", "set_coverage", "set_size"):
        v = metrics.get(k, last.get(k) if k in ("binary_acc", "mean_ap", "set_coverage", "set_size") else None)
        if v is not None:
            summary[k] = float(v)
    if "aaf" not in summary and acc is not None:
        summary["aaf"] = float(np.mean(acc))
    ap = metrics.get("task_ap") or last.get("task_ap")
    n_img = metrics.get("n_images") or last.get("n_images")

    model = p.get("model", {})
    trainable = info.get("trainable_params_per_task") or []
    weights = (f"pretrained: {model['pretrained']}" if model.get("pretrained")
               else "NO pretrained weights: seeded random init")
    lines = [
        f"# Model card: lorax attributor after task `{tasks[-1]}` ({len(tasks)} task{'s' * (len(tasks) > 1)})",
        "",
        f"Continual attribution of images: real, or made by which of {len(tasks)} known generators. Method "
        f"`{info.get('method')}` on a frozen `{model.get('backbone')}` backbone "
        f"({weights}), "
        f"crop {model.get('img_size')} px (images are cropped, never resized). Saved {info.get('saved_at', '?')}.",
        "",
        "| | |",
        "|---|---|",
        f"| tasks (in order) | {', '.join(tasks)} |",
        f"| classes | {2 * len(tasks)} (task i: 2i = its real images, 2i+1 = its fakes) |",
        f"| trainable parameters per task | {', '.join(str(t) for t in trainable) or 'n/a'} |",
        f"| frozen backbone parameters | {info.get('backbone_params', 'n/a')} |",
        f"| adapter | {p.get('adapter', {}).get('kind', '?')} r={p.get('adapter', {}).get('r', '?')} |",
        f"| exemplar memory | {p.get('continual', {}).get('memory_size', '?')} "
        f"({p.get('continual', {}).get('selection', '?')}) |",
        "",
        "## Metrics",
        "",
        "Accuracies in %. Multi-real: a real image counted correct when predicted as any real class; a fake must "
        "get its own generator.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    labels = {"aa": "AA (average incremental accuracy)", "aaf": "AAF (average accuracy after the last task)",
              "bwt": "BWT (backward transfer)", "forgetting": "forgetting (-BWT)",
              "binary_acc": "binary real/fake accuracy", "mean_ap": "mean AP (real vs fake)",
              "set_coverage": "prediction-set coverage (true label in `generators`)",
              "set_size": "prediction-set mean size (labels)"}
    lines += [f"| {labels[k]} | {_fmt(summary[k])} |" for k in labels if k in summary] or ["| (none given) | |"]
    lines += ["", "## Tasks", "", "| # | task | accuracy now | AP | val images |", "|---|---|---|---|---|"]
    for i, t in enumerate(tasks):
        lines.append(f"| {i} | {t} | {_fmt(acc[i] if acc else None, 1)} | {_fmt(ap[i] if ap else None, 1)} | "
                     f"{_fmt(n_img[i] if n_img and i < len(n_img) else None)} |")
    if R is not None:
        plot_accuracy_matrix(R, tasks, out_dir / "acc_matrix.png")
        lines += ["", "## Accuracy matrix", "", "R[i, j]: accuracy on task i after training task j.", "",
                  "![accuracy matrix](acc_matrix.png)"]
    if cm is not None and cm.shape[0] == 2 * len(tasks):
        plot_confusion(cm, class_names(tasks), out_dir / "confusion.png")
        lines += ["", "## Confusion matrix", "", "On the validation images of every task, after the last task.", "",
                  "![confusion matrix](confusion.png)"]
    lines += ["", "## Known failure cases", "", "Lowest-accuracy tasks:", "", *_failures(tasks, acc, cm)]
    from lorax.serving.openset import openset_dir

    os_meta = openset_dir(state_dir) / "openset.json"
    lines += ["", "## Unknown generators", ""]
    if os_meta.is_file():
        m = json.loads(os_meta.read_text())
        lines.append(f"Open-set score calibrated: threshold {m['threshold']:.3f} = the "
                     f"{100 * m.get('quantile', 0.95):.0f}th percentile of {m.get('n_val', '?')} known validation "
                     "images, so about 5% of images from known generators score above it by design; a row is `unknown` only "
                     "when its verdict is also fake.")
    else:
        lines.append("No open-set calibration stored with this state (`lorax calibrate`); `unknown_score` is empty.")
    lines += ["", "## Intended use and limits", "",
              "- Attributes images to the generators listed above; an image from another generator gets one of "
              "these labels anyway: read `unknown` / `lorax scan` for those.",
              "- Images smaller than the crop are refused; larger ones are scored on centre/grid crops.",
              "- Accuracies are on held-out images of the same generators and domains as training."]
    if not model.get("pretrained"):
        lines.append("- The backbone has no pretrained weights: features are weak and numbers are not comparable "
                     "with the paper's.")
    path = out_dir / CARD_FILE
    path.write_text("\n".join(lines) + "\n")
    return path
