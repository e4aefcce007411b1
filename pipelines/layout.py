"""Where every step of the pipeline reads and writes, for one project (or one ``lorax train --out`` folder).

Paths of a project (relative to its root)::

    data/synth/<task>.json          synth: what was synthesised (or that data.source is folder)
    <data.root>/<task>/             the task's images (the zoo writes them here)
    <data.manifests>/<task>.parquet prepare (+ <task>.quarantine.csv)
    state/init/stream.json          init: the stream's MLflow parent run (passed explicitly to every task)
    state/<task>/                   train: the model after the task (adapters, heads, state.json)
    state/<task>.openset/           evaluate: the state's open-set calibration (unknown-generator score)
    memory/<task>.parquet           select: exemplar memory after the task (memory/init.parquet is empty)
    reports/eval/<task>.json        evaluate: one column of the accuracy matrix (+ .predictions.csv)
    reports/registry/<task>.json    register: the registered version and its gate result
    reports/metrics.json            report: the headline figures (AA, AAF, BWT, accuracies...: DVC metrics)
    reports/metrics_details.json    report: the accuracy matrix, per-task lists, controls; reports/plots/*

``lorax train --out OUT`` (and the torchrun entry point) use the same tree with the reports at the top of OUT
(:meth:`Layout.run`): OUT/state, OUT/memory, OUT/eval, OUT/metrics.json (+ metrics_details.json), OUT/plots.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorax.config import Params

INIT = "init"  # the stream's root: state/init/stream.json, memory/init.parquet (empty)
RUN_FILE = "mlflow_run.json"  # in state/<task>.resume/: the task's run id while it trains (resume continues it)


@dataclass(frozen=True)
class Layout:
    """Where every step reads and writes.

    ``root`` holds the step outputs (state/, memory/); ``reports`` the evaluations, registry records, metrics and
    plots; ``project`` is the project root, whose data, tracking store and feature store every layout of the
    project shares (equal to ``root`` for a project; ``lorax train --out`` keeps its own)."""

    root: Path
    data_root: Path
    manifests: Path
    project: Path
    reports: Path

    @classmethod
    def from_params(cls, params: Params, root: str | Path = ".") -> Layout:
        """The project's layout (DVC stages, the Prefect flows' stream, ``lorax demo``)."""
        root = Path(root).resolve()
        return cls(root, root / params.data.root, root / params.data.manifests, root, root / "reports")

    @classmethod
    def run(cls, params: Params, out: str | Path, manifests: str | Path) -> Layout:
        """The layout of one ``lorax train --out OUT`` run: manifests from anywhere, everything else in OUT."""
        out = Path(out).resolve()
        return cls(out, Path(params.data.root).resolve(), Path(manifests).resolve(), out, out)

    def synth_marker(self, task: str) -> Path:
        return self.root / "data" / "synth" / f"{task}.json"

    def manifest(self, task: str) -> Path:
        return self.manifests / f"{task}.parquet"

    def state(self, task: str) -> Path:
        return self.root / "state" / task

    def memory(self, task: str) -> Path:
        return self.root / "memory" / f"{task}.parquet"

    def eval(self, task: str) -> Path:
        return self.reports / "eval" / f"{task}.json"

    def registry(self, task: str) -> Path:
        return self.reports / "registry" / f"{task}.json"

    @property
    def stream_file(self) -> Path:
        return self.state(INIT) / "stream.json"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def metrics_details(self) -> Path:
        from lorax.continual.summary import details_path

        return details_path(self.metrics)

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def locks(self) -> Path:
        """Lock files live outside the project (DVC hashes state/ and reports/); one folder per project root."""
        key = hashlib.sha1(str(self.project).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / "lorax-locks" / key
