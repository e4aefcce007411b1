"""The pipeline's ``detect`` and ``register`` steps of the detector and its runs in MLflow
(``pipelines/detection/dvc.yaml`` runs ``python -m pipelines.detect``, whose step is :func:`detect_step`, then
``python -m pipelines.register_detector``: :func:`register_detector_step`; the Prefect flow ``lorax-detect`` calls
the same two).

One MLflow run per detector training, in the experiment ``<tracking.experiment>-detect`` (the scenario's LoRAX runs
stay in their own experiment): the resolved settings as params (``detect.method`` and ``detect.train_tasks`` as
run), per-epoch figures (loss, bce, balance, router share, val AP) as step metrics, the metrics.json values
(``map``, ``mean_acc``, ``threshold``, ``ap.<generator>``, ``acc.<generator>``, ``<set>.map`` for test-only sets),
the robustness curves as ``robust_blur_map`` / ``robust_jpeg_map`` over the perturbation strength, and artifacts:
``metrics.json``, ``robustness.png``, the per-generator and robustness tables, the ``detector.safetensors``
checkpoint. Only :class:`~pipelines.tracking.tracker.Tracker` calls are used, so any tracking store the stream uses works.
Training and scoring are the library's (:func:`lorax.detect.runner.run_detect`, :mod:`lorax.detect.evaluate`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorax.config import Params
from lorax.detect.evaluate import per_generator_table, robustness_table
from lorax.detect.runner import detect_params, run_detect

__all__ = ["DETECT_DIR", "detect_experiment", "detect_step", "log_detect_metrics", "register_detector_step",
           "tracked_run_detect"]

log = logging.getLogger(__name__)

DETECT_DIR = Path("reports") / "detect"  # the pipeline stage's outputs, under the project root


def _safe(name: str) -> str:
    """An MLflow-valid metric name (letters, digits, ``_ - . / space``): ``val_acc@0.5`` -> ``val_acc_0.5``."""
    return re.sub(r"[^\w.\-/ ]", "_", name)


def detect_experiment(params: Params) -> str:
    """The detector runs' experiment: the scenario's experiment name + ``-detect``."""
    from pipelines.tracking.tracker import experiment_name

    return f"{experiment_name(params)}-detect"


def log_detect_metrics(tracker, run_id: str, metrics: Mapping[str, Any]) -> None:
    """The metrics.json values as MLflow metrics (numbers only; robustness as curves over the strength)."""
    flat: dict[str, Any] = {k: metrics.get(k) for k in ("map", "mean_acc", "threshold", "trainable_params",
                                                        "backbone_params", "train_seconds")}
    for g, m in (metrics.get("per_generator") or {}).items():
        flat.update({f"{k}.{g}": m.get(k) for k in ("ap", "acc", "real_acc", "fake_acc")})
    for g, m in (metrics.get("seen") or {}).items():
        flat.update({f"seen_ap.{g}": m.get("ap"), f"seen_acc.{g}": m.get("acc")})
    for name, res in (metrics.get("extra") or {}).items():
        flat.update({f"{name}.map": res.get("map"), f"{name}.mean_acc": res.get("mean_acc")})
        flat.update({f"{name}.ap.{g}": m.get("ap") for g, m in (res.get("per_generator") or {}).items()})
    tracker.log_metrics(run_id, {_safe(k): v for k, v in flat.items() if v is not None})
    for kind, curve in (metrics.get("robustness") or {}).items():
        for level, v in curve.items():
            if v is not None:  # MLflow steps are integers: sigma 1..4, JPEG quality 90..30, scale in percent
                step = int(round(float(level) * (100 if kind == "scale" else 1)))
                tracker.log_metrics(run_id, {f"robust_{kind}_map": v}, step=step)


def tracked_run_detect(
    params: Params,
    manifests_dir: str | Path,
    out_dir: str | Path,
    tracker=None,
    *,
    method: str | None = None,
    train_tasks: list[str] | None = None,
    extra_eval: Mapping[str, str | Path] | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    root: str | Path = ".",
    store: Any = None,
) -> dict[str, Any]:
    """:func:`~lorax.detect.runner.run_detect`, logged as one MLflow run when ``tracker`` is given.

    The run is created before training (so per-epoch metrics stream in), nested under ``parent_run_id`` when given,
    and ends FAILED (KILLED on Ctrl-C) if training fails. Returns the metrics; ``metrics["mlflow_run_id"]`` is set
    when tracked. ``store``: the feature store of ``detect.views >= 1`` (default: ``cache:`` from the working
    directory).
    """
    method = method or params.detect.method
    train_tasks = list(train_tasks or params.detect.train_tasks)
    if tracker is None:
        return run_detect(params, manifests_dir, out_dir, method=method, train_tasks=train_tasks,
                          extra_eval=extra_eval, store=store)
    from pipelines.tracking.env import environment_tags
    from pipelines.tracking.tracker import run_params

    resolved = detect_params(params)
    if tracker.experiment != detect_experiment(params):  # this tracker now logs to the detector experiment
        tracker.experiment, tracker._experiment_id = detect_experiment(params), None
    run_tags = {"lorax.kind": "detect", "lorax.scenario": params.tracking.scenario, "lorax.method": method,
                "lorax.train_tasks": ",".join(train_tasks), "lorax.backbone": resolved.model.backbone,
                **environment_tags(root), **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = tracker.client.create_run(tracker.experiment_id, run_name=run_name or f"{method}-{'+'.join(train_tasks)}",
                                    tags={k: str(v)[:5000] for k, v in run_tags.items()})
    run_id = run.info.run_id
    values = run_params(resolved)
    values.update({"detect.method": method, "detect.train_tasks": ",".join(train_tasks),
                   "detect.manifests": str(manifests_dir)})
    tracker.log_params(run_id, values)

    def epoch_cb(epoch: int, logs: dict[str, float]) -> None:
        tracker.log_metrics(run_id, {_safe(k): v for k, v in logs.items()}, step=epoch + 1)

    try:
        metrics = run_detect(params, manifests_dir, out_dir, method=method, train_tasks=train_tasks,
                             extra_eval=extra_eval, callback=epoch_cb, store=store)
    except BaseException as e:
        with contextlib.suppress(Exception):
            tracker.finish(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    out = Path(out_dir)
    log_detect_metrics(tracker, run_id, metrics)
    tracker.log_table(run_id, per_generator_table(metrics), "tables/per_generator.json")
    tracker.log_table(run_id, robustness_table(metrics), "tables/robustness.json")
    tracker.log_artifact(run_id, out / "metrics.json")
    tracker.log_artifact(run_id, out / "robustness.png", "plots")
    tracker.log_artifact(run_id, out / "detector.safetensors", "checkpoint")
    from pipelines.tracking.detector_registry import ID_TAG, detector_id

    tracker.set_tags(run_id, {"lorax.eval_tasks": ",".join(metrics["eval_tasks"]),
                              ID_TAG: detector_id(out / "detector.safetensors")})  # the registry finds the run by it
    tracker.finish(run_id)
    metrics["mlflow_run_id"] = run_id
    log.info("detect: MLflow run %s in experiment %s (%s)", run_id, tracker.experiment, tracker.uri)
    return metrics


def detect_step(params: Params, layout, tracker=None) -> dict[str, Any]:
    """The pipeline's detector: train on ``detect.train_tasks``, evaluate on every other manifest of the project.

    Writes ``reports/detect/`` (metrics.json, robustness.png, robustness.csv, per_generator.csv,
    detector.safetensors, scores.parquet) and logs one MLflow run when ``tracker`` is given.
    """
    from lorax.features import open_store

    out = layout.root / DETECT_DIR
    metrics = tracked_run_detect(params, layout.manifests, out, tracker, root=layout.root,
                                 store=open_store(params.cache, layout.project))
    robustness_table(metrics).to_csv(out / "robustness.csv", index=False)
    per_generator_table(metrics).to_csv(out / "per_generator.csv", index=False)
    return metrics


def register_detector_step(params: Params, layout, tracker) -> dict[str, Any]:
    """Register ``reports/detect/detector.safetensors`` as a version of ``detect.registered_model``; ``champion``
    moves only when its training generators' val AP passes ``detect.register_min_ap``
    (:mod:`pipelines.tracking.detector_registry`). Writes the record to ``reports/detect/registry.json``."""
    import json

    from lorax.utils.io import write_json
    from pipelines.tracking.detector_registry import register_detector

    out = layout.root / DETECT_DIR
    checkpoint, metrics_file = out / "detector.safetensors", out / "metrics.json"
    for f in (checkpoint, metrics_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found; run the detect step first (dvc repro "
                                    "pipelines/detection/dvc.yaml, or python -m pipelines.flows detect)")
    metrics = json.loads(metrics_file.read_text())
    rec = register_detector(tracker, checkpoint, metrics, experiment=detect_experiment(params),
                            min_ap=params.detect.register_min_ap, name=params.detect.registered_model)
    # a stable record of the registration (aliases move later; the registry shows the current ones)
    write_json(out / "registry.json", {k: v for k, v in rec.items() if k not in ("aliases", "registered_now")})
    return rec
