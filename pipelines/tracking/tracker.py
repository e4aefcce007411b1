"""MLflow runs of a continual stream: one experiment per scenario, a parent run per stream, a nested run per task.

Only the client API is used (no global "active run"): every call names its run id, so DVC stage processes,
Prefect tasks in threads and tests can log to the same stream without sharing state. The parent run id is passed
explicitly and saved in the stage outputs (``state/init/stream.json``, then each ``state.json``), so a re-run or a
resumed task continues the right runs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorax.config import Params, params_to_dict
from pipelines.tracking.env import environment_tags
from pipelines.tracking.flat import flatten
from pipelines.tracking.uri import TrackingUnavailable, artifact_location, check_reachable

log = logging.getLogger(__name__)

MAX_BATCH = 100  # MLflow's limit of params/tags/metrics per log_batch call


def experiment_name(params: Params) -> str:
    try:
        return params.tracking.experiment.format(scenario=params.tracking.scenario)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"tracking.experiment: {params.tracking.experiment!r} has an unknown placeholder ({e}); "
            "allowed: {scenario}"
        ) from None


def run_params(params: Params) -> dict[str, str]:
    """The resolved settings, flattened (``train.epochs``); the stream is a tag (params cannot change)."""
    d = params_to_dict(params)
    d.pop("stream", None)
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(d).items()}


class Tracker:
    """A stream's MLflow runs. Construction checks that the tracking store answers (fast, clear error)."""

    def __init__(self, params: Params, root: str | Path = ".") -> None:
        self.params = params
        self.root = Path(root)
        self.uri = check_reachable(params.tracking, self.root)
        if self.uri.startswith(("http://", "https://")):
            # a server that dies mid-run should fail in seconds, not after MLflow's minutes of backoff
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(self.uri)  # models:/ downloads resolve through the global URIs
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(self.uri, registry_uri=self.uri)
        self.experiment = experiment_name(params)
        self._experiment_id: str | None = None

    # ---- experiment and runs ----
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment,
                        artifact_location=artifact_location(self.params.tracking, self.root, self.experiment, self.uri),
                        tags={"lorax.scenario": self.params.tracking.scenario},
                    )
                except MlflowException:  # created meanwhile by another process
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def start_stream(self, tasks: list[str]) -> str:
        """A new parent run for a stream: params, environment tags; returns its id."""
        p = self.params
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{p.tracking.scenario}-{p.continual.method}-{time.strftime('%m%d-%H%M%S')}",
            tags={
                "lorax.kind": "stream",
                "lorax.scenario": p.tracking.scenario,
                "lorax.method": p.continual.method,
                "lorax.tasks": ",".join(tasks),
                **environment_tags(self.root),
            },
        )
        self.log_params(run.info.run_id, run_params(p))
        return run.info.run_id

    def run_started(self, run_id: str) -> str:
        """When ``run_id`` started (UTC, ISO 8601): a record's time that is the run's, not the writer's."""
        ms = self.client.get_run(run_id).info.start_time or 0
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))

    def require_run(self, run_id: str, where: str) -> None:
        """Fail with the fix when ``run_id`` (read from ``where``) is not in this store."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            raise TrackingUnavailable(
                f"{where} names MLflow run {run_id}, which is not in the tracking store {self.uri}. Point "
                f"tracking.uri / MLFLOW_TRACKING_URI at the store that has it, or start a new stream "
                f"(`dvc repro -f init`, or delete the state/ folder)"
            ) from None

    def start_task(self, parent_run_id: str, task: str, task_index: int, resume_run_id: str | None = None) -> str:
        """The nested run of one task; ``resume_run_id`` (from an interrupted attempt) is continued if it exists."""
        from mlflow.exceptions import MlflowException

        if resume_run_id:
            try:
                run = self.client.get_run(resume_run_id)
                if run.data.tags.get("mlflow.parentRunId") == parent_run_id:
                    self.client.update_run(resume_run_id, status="RUNNING")
                    self.client.set_tag(resume_run_id, "lorax.resumed", "true")
                    return resume_run_id
            except MlflowException:
                pass
        self.client.update_run(parent_run_id, status="RUNNING")
        run = self.client.create_run(
            self.experiment_id,
            run_name=task,
            tags={
                "mlflow.parentRunId": parent_run_id,
                "lorax.kind": "task",
                "lorax.task": task,
                "lorax.task_index": str(task_index),
                "lorax.scenario": self.params.tracking.scenario,
                **environment_tags(self.root),
            },
        )
        self.log_params(run.info.run_id, run_params(self.params))
        return run.info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def stopped(self, run_id: str, error: BaseException, metric: str = "loss") -> None:
        """End a run that did not finish: KILLED when it was told to stop (Ctrl-C, SIGTERM, its starter gone),
        FAILED otherwise; tagged with why and the last epoch it logged (``metric``'s last step), so the UI shows
        where it stopped. A re-run continues it."""
        from pipelines.lifetime import Stopped

        killed = isinstance(error, (KeyboardInterrupt, Stopped))
        steps = [m.step for m in self.client.get_metric_history(run_id, metric)]
        self.set_tags(run_id, {"lorax.stopped_by": str(error).splitlines()[0][:200] if str(error)
                               else type(error).__name__, "lorax.epoch_reached": max(steps, default=0)})
        self.finish(run_id, "KILLED" if killed else "FAILED")

    # ---- logging ----
    def log_params(self, run_id: str, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MAX_BATCH])

    def log_metrics(self, run_id: str, values: dict[str, float], step: int | None = None) -> None:
        """One batched call for all ``values`` (non-numbers and NaN are skipped)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in values.items()
                 if isinstance(v, (int, float)) and v == v]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + MAX_BATCH])

    def epoch_callback(self, run_id: str) -> Callable[[int, dict[str, float]], None]:
        """The trainer's per-epoch callback: loss, train accuracy and lr of the epoch in one batched call."""

        def cb(epoch: int, row: dict[str, float]) -> None:
            self.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=epoch)

        return cb

    def log_missing_epochs(self, run_id: str, rows: list[dict[str, float]], metric: str = "loss") -> list[int]:
        """Log the epochs of ``rows`` (the trained state's history) that the run lacks: a stage killed between an
        epoch's checkpoint and its report resumes after that epoch, which then is never reported. Each step is
        logged once (no duplicates); returns the epochs logged now."""
        have = {m.step for m in self.client.get_metric_history(run_id, metric)}
        missing = [row for row in rows if int(row.get("epoch", 0)) not in have]
        for row in missing:
            self.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        return [int(row["epoch"]) for row in missing]

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, tags=items[i:i + MAX_BATCH])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(run_id, str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(run_id, str(p), artifact_path)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_table(self, run_id: str, df, artifact_file: str) -> None:
        """A pandas table as an MLflow table artifact (shown in the UI's artifact view and evaluation tab)."""
        with tempfile.TemporaryDirectory() as tmp:
            # log_table refuses to overwrite across re-runs in some versions; write the JSON ourselves
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps({"columns": [str(c) for c in df.columns], "data": df.values.tolist()},
                                       default=str))
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)
