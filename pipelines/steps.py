"""The pipeline's steps, written once: the DVC stages (``python -m pipelines.<stage>``), the Prefect flows
(:mod:`pipelines.flows`), ``lorax train`` (:mod:`pipelines.train_stream`) and the torchrun entry point
(:mod:`pipelines.ddp`) all call these functions over a :class:`~pipelines.layout.Layout`.

This module holds the chain that makes a model: init -> synth -> prepare -> train -> select -> evaluate (with the
state's open-set calibration); :mod:`pipelines.publish` holds register and report, the steps that publish.
Every step skips work whose output is already complete and current (a Prefect retry or a second ``lorax train``
never redoes a finished step; an interrupted training resumes from its last epoch checkpoint in
``state/<task>.resume/``). DVC removes a stage's outputs before running it, so under DVC the steps always run.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from lorax.config import ConfigError, Params
from lorax.utils.io import read_json, write_json
from lorax.utils.progress import timed
from pipelines.layout import INIT, RUN_FILE, Layout

log = logging.getLogger(__name__)


def _state_info(state_dir: Path) -> dict[str, Any]:
    return read_json(state_dir / "state.json", f"{state_dir} is not a finished state; train its task first")


def _is_complete_state(state_dir: Path, tasks: list[str]) -> bool:
    try:
        return _state_info(state_dir).get("tasks") == tasks
    except (FileNotFoundError, ValueError):
        return False


def _index(params: Params, task: str) -> int:
    if task not in params.stream:
        raise ConfigError(f"task {task!r} is not in the stream of params.yaml (stream: {params.tasks}); "
                          f"add it with `lorax stream add {task}`")
    return params.tasks.index(task)


def stream_run(layout: Layout, prev: str, required: bool = True) -> dict[str, Any]:
    """The tracking ids a task inherits from its predecessor (``state/init/stream.json`` for the first task).

    ``required=False``: a stream that was never started by the init step (``lorax train``) inherits none."""
    if prev == INIT:
        if not required and not layout.stream_file.is_file():
            return {}
        return read_json(layout.stream_file, "run the init stage (`dvc repro init`) first")
    return dict(_state_info(layout.state(prev)).get("tracking") or {})


def feature_store(params: Params, layout: Layout):
    """The project's feature store (``cache:``; relative folders from the project root)."""
    from lorax.features import open_store

    return open_store(params.cache, layout.project)


def init_step(params: Params, layout: Layout, tracker=None) -> Path:
    """Start a stream: its MLflow parent run (if tracking), the empty memory and the registry chain's root.

    The three outputs hold no time of their own (``created`` is the parent run's start), so what DVC restores from
    its cache is what a re-run would write."""
    from lorax.continual.memory import ExemplarMemory

    existing = layout.stream_file
    if existing.is_file() and layout.memory(INIT).is_file() and layout.registry(INIT).is_file():
        parent = read_json(existing).get("parent_run_id")
        if tracker is not None and parent:
            tracker.require_run(parent, str(existing))
        return existing
    run_id = tracker.start_stream(params.tasks) if tracker is not None else None
    write_json(existing, {
        "parent_run_id": run_id,
        "experiment": tracker.experiment if tracker else None,
        "experiment_id": tracker.experiment_id if tracker else None,
        "tracking_uri": tracker.uri if tracker else None,
        "method": params.continual.method,
        "created": tracker.run_started(run_id) if run_id else None,
    })
    ExemplarMemory().save(layout.memory(INIT))
    write_json(layout.registry(INIT), {"task": INIT, "version": None})
    log.info("stream started%s", f": MLflow parent run {run_id} in {tracker.uri}" if run_id else " (no tracking)")
    return existing


def synth_step(params: Params, layout: Layout, task: str) -> Path:
    """Built-in data: synthesise the zoo task under data.root. Folder data: check the task folder exists."""
    _index(params, task)
    if params.data.source == "builtin":
        from lorax.data import zoo

        counts = zoo.synth_task(task, layout.data_root, params.zoo)
        meta = json.loads((layout.data_root / task / "zoo.json").read_text())
        marker = {"source": "builtin", "task": task, "root": params.data.root, "counts": counts,
                  "sha256": meta.get("sha256")}
    else:
        folder = layout.data_root / task
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: task folder not found; with data.source: folder every stream task is a folder under "
                f"data.root ({layout.data_root}). Fix the name in params.yaml stream or data.root"
            )
        marker = {"source": "folder", "task": task, "root": str(layout.data_root),
                  "note": "images are read from the dataset; nothing synthesised"}
    return write_json(layout.synth_marker(task), marker)


def prepare_step(params: Params, layout: Layout, task: str, task_index: int | None = None):
    """Scan the task folder once: manifest + quarantine report (bad files are listed, not fatal below the limit)."""
    from lorax.data.prepare import prepare_task

    i = _index(params, task) if task_index is None else task_index
    res = prepare_task(layout.data_root, task, i, layout.manifests, params.data, params.model.img_size)
    log.info("%s", res.summary())
    return res


def _manifests(params: Params, layout: Layout, upto: int) -> dict[str, Any]:
    from lorax.data.manifest import load_stream_manifests

    return load_stream_manifests(layout.manifests, params.tasks[: upto + 1], layout.data_root)


def train_step(params: Params, layout: Layout, task: str, tracker=None, exclusive: bool = True) -> Path:
    """Train one task on top of its predecessor's state; resumes an interrupted attempt (and its MLflow run).

    ``exclusive``: hold the task's lock while training (:func:`pipelines.lifetime.task_lock`: one trainer per
    resume point); the data-parallel entry point passes it on rank 0 only, where the others train with it."""
    from pipelines.lifetime import task_lock

    out = layout.state(task)
    lock = task_lock(layout.locks, out, task) if exclusive else contextlib.nullcontext()
    with lock, timed(log, f"task {task}: train"):
        return _train_step(params, layout, task, tracker)


def _train_step(params: Params, layout: Layout, task: str, tracker=None) -> Path:
    i = _index(params, task)
    tasks, prev = params.tasks, params.stream[task].prev
    out = layout.state(task)
    if _is_complete_state(out, tasks[: i + 1]):
        log.info("task %s: state %s is complete; skipped", task, out)
        return out
    from lorax.continual.memory import ExemplarMemory
    from lorax.continual.state import resume_dir, resume_dirs
    from lorax.continual.trainer import train_task

    prev_state = None if prev == INIT else layout.state(prev)
    if prev_state is not None and not _is_complete_state(prev_state, tasks[:i]):
        raise FileNotFoundError(f"{prev_state}: the state after {prev!r} (tasks {tasks[:i]}) is missing or from "
                                f"another stream; train {prev!r} first")
    manifests = _manifests(params, layout, i)
    prev_mem = layout.memory(prev)
    memory = ExemplarMemory.load(prev_mem, layout.data_root) if prev_mem.is_file() else None
    ids = stream_run(layout, prev, required=tracker is not None)
    parent, run_id = ids.get("parent_run_id"), None
    if tracker is not None and parent:
        tracker.require_run(parent, str(layout.stream_file if prev == INIT else prev_state / "state.json"))
        found = next((d / RUN_FILE for d in resume_dirs(out) if (d / RUN_FILE).is_file()), None)
        resume = json.loads(found.read_text()).get("run_id") if found is not None else None
        run_id = tracker.start_task(parent, task, i, resume)
        write_json(resume_dir(out) / RUN_FILE, {"run_id": run_id, "parent_run_id": parent})
    tracking = {"parent_run_id": parent, "run_id": run_id, "experiment_id": ids.get("experiment_id"),
                "tracking_uri": tracker.uri if tracker else ids.get("tracking_uri")}
    try:
        train_task(prev_state, manifests[task], memory, params, out, history=[manifests[t] for t in tasks[:i]],
                   callback=tracker.epoch_callback(run_id) if run_id else None, extra_info={"tracking": tracking},
                   store=feature_store(params, layout))
    except BaseException as e:
        if run_id:
            with contextlib.suppress(Exception):
                tracker.stopped(run_id, e)
        raise
    if run_id:
        info = _state_info(out)
        tracker.log_missing_epochs(run_id, info.get("epochs") or [])  # an epoch checkpointed, then killed
        tracker.log_metrics(run_id, {"train_seconds": info["seconds_per_task"][-1],
                                     "trainable_params": info["trainable_params_per_task"][-1]})
    return out


def select_step(params: Params, layout: Layout, task: str) -> Path:
    """Exemplar memory after the task: old classes shrunk to the new budget, the task's classes selected."""
    i = _index(params, task)
    state, out = layout.state(task), layout.memory(task)
    info_file = state / "state.json"
    if out.is_file() and info_file.is_file() and out.stat().st_mtime >= info_file.stat().st_mtime:
        log.info("task %s: memory %s is newer than its state; skipped", task, out)
        return out
    from lorax.continual.memory import ExemplarMemory
    from lorax.continual.state import load_state
    from lorax.continual.selection import select_exemplars

    with timed(log, f"task {task}: select exemplars"):
        method, _ = load_state(state, params=params)
        prev_mem = layout.memory(params.stream[task].prev)
        memory = ExemplarMemory.load(prev_mem, layout.data_root) if prev_mem.is_file() else None
        mem = select_exemplars(method, _manifests(params, layout, i)[task], memory, params,
                               store=feature_store(params, layout))
        mem.save(out, layout.data_root)
    log.info("task %s: memory %d exemplars %s -> %s", task, len(mem), mem.class_counts(), out)
    return out


def evaluate_step(params: Params, layout: Layout, task: str, openset: bool = True) -> dict[str, Any]:
    """Accuracy on the validation images of every task seen so far (one column of the accuracy matrix), and the
    state's open-set calibration (``openset``; ``lorax train`` does not calibrate), from one pass of the model over
    those images."""
    with timed(log, f"task {task}: evaluate"):
        return _evaluate_step(params, layout, task, openset)


def _evaluate_step(params: Params, layout: Layout, task: str, openset: bool) -> dict[str, Any]:
    from lorax.continual.state import state_hash

    i = _index(params, task)
    tasks = params.tasks[: i + 1]
    state, out = layout.state(task), layout.eval(task)
    sid = state_hash(state) if state.is_dir() else None
    if out.is_file() and sid is not None and read_json(out).get("state_id") == sid:
        log.info("task %s: evaluation %s is current; skipped", task, out)
        if openset:
            calibrate_openset(params, layout, task)  # a no-op when current
        return _add_missing_controls(params, layout, task, read_json(out))
    from lorax.continual.state import load_state
    from lorax.continual.evaluation import (evaluate_controls, predict_logits, score_val, set_scores, val_rows,
                                            verdict_scores)
    from lorax.serving.schema import write_csv

    info = _state_info(state)
    if info.get("tasks") != tasks:
        raise ValueError(f"{state}: holds tasks {info.get('tasks')}, expected {tasks}; re-run the train step")
    method, loaded_info = load_state(state, params=params)
    manifests = _manifests(params, layout, i)
    val = val_rows([manifests[t] for t in tasks])
    store = feature_store(params, layout)
    logits, val_feats = predict_logits(method, val, params, features=True, store=store)
    result, table = score_val(val, logits, tasks, *verdict_scores(method, val_feats),
                              sets=set_scores(method, logits, val_feats))
    result.update(task=task, task_index=i, tasks=tasks, state_id=sid)
    control = evaluate_controls(method, val, params, store=store)  # eval.resample_control: {} when off
    if control:
        result["control"] = control
    if openset:
        calibrate_openset(params, layout, task, loaded=(method, manifests, val_feats, store))  # this pass's features
    write_json(out, result)
    write_csv(table, out.with_suffix(".predictions.csv"))  # the row schema of lorax.serving.schema
    log.info("task %s: accuracy per task %s, mean %.2f, binary %.2f (real called real %.1f, balanced %.1f)", task,
             {t: round(a, 2) for t, a in zip(tasks, result["task_acc"], strict=True)}, result["mean_acc"],
             result["binary_acc"], result["real_acc"], result["balanced_acc"])
    if "set_coverage" in result:
        log.info("task %s: prediction sets cover %.1f%% of val images (target %.0f%%), mean size %.2f labels", task,
                 result["set_coverage"], 100 * method.sets.coverage, result["set_size"])
    return result

def _add_missing_controls(params: Params, layout: Layout, task: str, result: dict[str, Any]) -> dict[str, Any]:
    """A current evaluation made before ``eval.resample_control`` was switched on gets the control added (the rest
    is kept), so switching the control on never re-evaluates a finished stream."""
    from lorax.data.dataset import control_views

    have = tuple(result.get("control") or {})
    if not set(control_views(params.eval.resample_control, params.eval.jpeg_control)) - set(have):
        return result
    from lorax.continual.state import load_state
    from lorax.continual.evaluation import evaluate_controls, val_rows

    i = _index(params, task)
    method, _ = load_state(layout.state(task), params=params)
    manifests = _manifests(params, layout, i)
    val = val_rows([manifests[t] for t in params.tasks[: i + 1]])
    control = evaluate_controls(method, val, params, store=feature_store(params, layout), skip=have)
    result["control"] = {**(result.get("control") or {}), **control}
    write_json(layout.eval(task), result)
    return result


def calibrate_openset(params: Params, layout: Layout, task: str,
                      loaded: tuple[Any, dict[str, Any], Any, Any] | None = None) -> Path:
    """The state's open-set calibration (``state/<task>.openset``), made once per state, so the registered
    version reports an unknown-generator score and flag (``lorax predict``, the served model, ``lorax scan``).

    The evaluate step passes what it has ``loaded``: (method, manifests, the val rows' super-features from its
    evaluation pass, its feature store), so only the calibration's train sample goes through the model here. Without it (a caller
    outside the evaluate step), the state is loaded and calibrated through the Predictor."""
    from lorax.serving import openset

    state = layout.state(task)
    out = openset.openset_dir(state)
    if openset.current_openset(state, out) is not None:
        return out
    if loaded is None:
        from lorax.serving.calibration import calibrate_state

        with timed(log, f"task {task}: open-set calibration"):
            return calibrate_state(state, layout.manifests, out, device=params.train.device)
    from lorax.continual.evaluation import predict_logits

    method, manifests, val_feats, store = loaded
    tasks = list(method.tasks)
    openset.check_manifests(layout.manifests, tasks)
    with timed(log, f"task {task}: open-set calibration"):
        rows = openset.calibration_rows(manifests, tasks, "train", openset.MAX_PER_CLASS, seed=0)
        _, train_feats = predict_logits(method, rows, params, features=True, desc="open-set train", store=store)
        stats = openset.calibration_from_features(train_feats, rows["class_id"].to_numpy(), val_feats, tasks,
                                                  params.eval.crops)
        return openset.store_calibration(stats, state, layout.manifests, out)

