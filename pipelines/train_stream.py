"""A whole stream in one process: ``lorax train`` (and, per rank, :mod:`pipelines.ddp`).

The same steps as the DVC stages (:mod:`pipelines.steps`), over :meth:`Layout.run(params, OUT, MANIFESTS)
<pipelines.layout.Layout.run>`: for each task train -> select exemplars -> evaluate, then the report step's
metrics.json and plots. Each finished task leaves ``OUT/state/<task>``, ``OUT/memory/<task>.parquet`` and
``OUT/eval/<task>.json``; a re-run skips what is complete and current and resumes an interrupted task from its
last epoch checkpoint. No tracking: ``lorax train`` writes files only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lorax.config import Params
from lorax.data.manifest import manifest_path
from pipelines.layout import Layout
from pipelines.publish import report_step
from pipelines.steps import evaluate_step, prepare_step, select_step, train_step

log = logging.getLogger(__name__)


def prepare_missing(params: Params, layout: Layout) -> list[str]:
    """With ``data.source: folder``, prepare the stream's tasks that have no manifest yet (the prepare step, from
    ``data.root``), so that ``lorax train`` runs on a fresh CDDB-layout folder; returns them. The built-in zoo is
    synthesised and prepared by ``lorax data synth`` / ``prepare`` (or ``dvc repro``)."""
    todo = [t for t in params.tasks if not manifest_path(layout.manifests, t).is_file()]
    if params.data.source != "folder" or not todo:
        return []
    root = layout.data_root
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {params.data.root} is not a folder; set -S data.root=DATASET (one folder "
                                "per task, CDDB layout TASK/{train,val}/{0_real,1_fake})")
    absent = [t for t in todo if not (root / t).is_dir()]
    if absent:  # before any work
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"stream: task folders {absent} not found in data.root {params.data.root} "
                                f"(found: {found}); fix the stream or data.root")
    for t in todo:
        prepare_step(params, layout, t)  # logs its summary
    return todo


def run_task(params: Params, layout: Layout, task: str) -> dict[str, Any]:
    """Train, select exemplars and evaluate one task (each skipped when already complete and current)."""
    train_step(params, layout, task)
    select_step(params, layout, task)
    return evaluate_step(params, layout, task, openset=False)


def run_stream(params: Params, manifests: str | Path, out: str | Path) -> dict[str, Any]:
    """Train the whole stream of ``params`` (resuming finished tasks); write ``OUT/metrics.json`` and plots."""
    layout = Layout.run(params, out, manifests)
    tasks = params.tasks
    for i, task in enumerate(tasks):
        log.info("=== task %d/%d: %s (%s) ===", i + 1, len(tasks), task, params.continual.method)
        run_task(params, layout, task)
    return report_step(params, layout)
