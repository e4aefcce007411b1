"""Prefect 3 flows: the second driver of the steps in :mod:`pipelines.steps` and :mod:`pipelines.publish` (DVC is the first).

* :func:`continual_flow` trains the whole stream of params.yaml (init, then per task synth -> prepare -> train ->
  select -> evaluate -> register, then the report).
* :func:`new_generator_flow` appends one task folder to params.yaml's stream (as ``lorax stream add`` does) and
  learns it on top of the latest state of that chain, gate passed or not: prepare -> train -> select exemplars ->
  evaluate -> register (the gate decides whether it becomes ``champion``) -> report.
* :func:`detect_flow` trains the real/fake detector and registers it (``lorax-detector``, gated ``champion``): the
  steps of ``pipelines/detection/dvc.yaml``.
* :func:`watch_flow` scans ``data.root`` for task folders that are not in the stream yet and runs
  :func:`new_generator_flow` for each, one at a time, in name order. ``lorax schedule --every 1h`` serves it.

One lineage: every flow grows params.yaml's stream, the chain DVC trains, in the project's folders, so either driver
finishes what the other started and a new generator is always learned on top of every generator learned before
(never on an older champion). In a DVC project the flows then record their stages in ``dvc.lock``
(:mod:`pipelines.dvc_record`), so ``dvc status`` shows them current and ``dvc repro`` does not redo them.

Each Prefect task, ``run_<step>`` (Prefect's unit of work; the stream's learning tasks are the ``name`` it is given),
wraps one step. Prefect tasks exchange paths (and small dicts), never tensors. Training, selection and evaluation
carry the ``gpu`` tag (``prefect concurrency-limit create gpu 1`` keeps one on the device at a time). A retry or a
re-run never redoes a finished step: each step skips outputs that are complete and current, and training resumes
from its last epoch checkpoint. Locks (``flock``, released when a process dies): one watch run at a time per
project, and one stream edit and training at a time per project, so two runs never train the same generator twice.

Run: ``python -m pipelines.flows continual|new TASK|watch|detect|serve --every SECONDS`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lorax,pipelines")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402

from pipelines import publish, steps  # noqa: E402
from pipelines.layout import Layout  # noqa: E402
from pipelines.locks import file_lock  # noqa: E402
from pipelines.stream_edit import append_to_stream, check_task_name, is_task_name  # noqa: E402
from lorax.config import Params, load_params  # noqa: E402
from pipelines.cli.project import parse_every  # noqa: E402

GPU_TAG = "gpu"
STREAM_LOCK_WAIT_S = 6 * 3600.0  # a second run waits for the first to finish its task, then finds it done
# what a task's registry record hands back to the flows (a fresh registration and a finished task alike)
RECORD_KEYS = ("version", "tasks", "aaf", "gate", "gate_reason", "parent", "gate_figures")

log = logging.getLogger(__name__)


def _layout(params: Params, root: str) -> Layout:
    """The project's layout, DVC's: the continual flow trains params.yaml's stream, the chain DVC trains."""
    return Layout.from_params(params, root)


def _tracker(params: Params, layout: Layout):
    from pipelines.tracking.tracker import Tracker

    return Tracker(params, layout.project)


# ------------------------------------------------------------------------------------------------ tasks
@task(name="check", cache_policy=NO_CACHE)
def run_check(params: Params, layout: Layout) -> str:
    from pipelines.check_params import check_step

    return str(check_step(params, layout))


@task(name="init", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def run_init(params: Params, layout: Layout) -> str:
    return str(steps.init_step(params, layout, _tracker(params, layout)))


@task(name="synth", task_run_name="synth-{name}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def run_synth(params: Params, layout: Layout, name: str) -> str:
    return str(steps.synth_step(params, layout, name))


@task(name="prepare", task_run_name="prepare-{name}", cache_policy=NO_CACHE)
def run_prepare(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    res = steps.prepare_step(params, layout, name)
    return {"manifest": str(res.manifest), "quarantine": str(res.quarantine), "bad": len(res.bad),
            "summary": res.summary()}


@task(name="train", task_run_name="train-{name}", cache_policy=NO_CACHE, tags=[GPU_TAG], retries=1,
      retry_delay_seconds=5)
def run_train(params: Params, layout: Layout, name: str) -> str:
    return str(steps.train_step(params, layout, name, _tracker(params, layout)))


@task(name="select", task_run_name="select-{name}", cache_policy=NO_CACHE, tags=[GPU_TAG], retries=1,
      retry_delay_seconds=2)
def run_select(params: Params, layout: Layout, name: str) -> str:
    return str(steps.select_step(params, layout, name))


@task(name="evaluate", task_run_name="evaluate-{name}", cache_policy=NO_CACHE, tags=[GPU_TAG], retries=1,
      retry_delay_seconds=2)
def run_evaluate(params: Params, layout: Layout, name: str) -> str:
    steps.evaluate_step(params, layout, name)
    return str(layout.eval(name))


@task(name="register", task_run_name="register-{name}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def run_register(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    rec = publish.register_step(params, layout, name, _tracker(params, layout))
    return {k: rec.get(k) for k in RECORD_KEYS}


@task(name="report", cache_policy=NO_CACHE)
def run_report(params: Params, layout: Layout) -> str:
    publish.report_step(params, layout, _tracker(params, layout))
    return str(layout.metrics)


@task(name="detect", cache_policy=NO_CACHE, tags=[GPU_TAG])
def run_detect(params: Params, layout: Layout) -> dict[str, Any]:
    from pipelines.detect_runs import detect_step

    m = detect_step(params, layout, _tracker(params, layout))
    return {k: m.get(k) for k in ("method", "train_tasks", "map", "threshold", "mlflow_run_id")}


@task(name="register-detector", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def run_register_detector(params: Params, layout: Layout) -> dict[str, Any]:
    from pipelines.detect_runs import register_detector_step

    rec = register_detector_step(params, layout, _tracker(params, layout))
    return {k: rec[k] for k in ("name", "version", "seen_map", "gate", "gate_reason", "aliases")}


# ------------------------------------------------------------------------------------------------ flows
@flow(name="lorax-continual", log_prints=True)
def continual_flow(params_path: str = "params.yaml", root: str = ".", overrides: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The whole stream of params.yaml; finished steps are skipped, so a re-run only does what is missing."""
    params = load_params(Path(root) / params_path, overrides)
    layout = _layout(params, root)
    _tracker(params, layout)  # a tracking server that is down fails here, before any work
    with file_lock(layout.locks / "stream.lock", blocking=True, timeout=STREAM_LOCK_WAIT_S) as held:
        if not held:
            raise TimeoutError(f"another run held the stream of {layout.root} for {STREAM_LOCK_WAIT_S:.0f}s")
        return _grow(params, layout)


def _grow(params: Params, layout: Layout) -> dict[str, Any]:
    """Every task of the stream in order (complete steps skip), the report, and the record in dvc.lock."""
    from pipelines.dvc_record import record_stages

    logger = get_run_logger()
    run_check(params, layout)
    run_init(params, layout)
    versions, prepared = [], {}
    for k, name in enumerate(params.tasks):
        done = _registered(layout, name)
        if done is not None:
            versions.append(done)
            continue
        logger.info("task %d/%d: %s", k + 1, len(params.tasks), name)
        run_synth(params, layout, name)
        prepared[name] = run_prepare(params, layout, name)
        run_train(params, layout, name)
        run_select(params, layout, name)
        run_evaluate(params, layout, name)
        versions.append(run_register(params, layout, name))
        v = versions[-1]
        logger.info("task %s: version %s, gate %s: %s", name, v["version"], v["gate"], v["gate_reason"])
    if not prepared and layout.metrics.is_file():  # every task was already registered: nothing new to report
        return {"metrics": str(layout.metrics), "versions": versions, "prepared": prepared, "dvc_lock": None}
    metrics = run_report(params, layout)
    recorded = record_stages(layout.root, params.tasks, ran=list(prepared))
    return {"metrics": metrics, "versions": versions, "prepared": prepared, "dvc_lock": recorded}


def _registered(layout: Layout, name: str) -> dict[str, Any] | None:
    """The registry record of a task whose registered state is the one on disk (nothing left to do), else None."""
    from lorax.continual.state import state_hash

    rec, state = layout.registry(name), layout.state(name)
    if not (rec.is_file() and (state / "state.json").is_file()):
        return None
    data = json.loads(rec.read_text())
    if data.get("state_id") != state_hash(state):
        return None
    return {k: data.get(k) for k in RECORD_KEYS}


@flow(name="lorax-new-generator", flow_run_name="new-generator-{name}", log_prints=True)
def new_generator_flow(name: str, params_path: str = "params.yaml", root: str = ".",
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append task folder ``name`` (under data.root) to the stream, learn it on top of the chain's latest state
    and register the result (the gate decides on ``champion``)."""
    logger = get_run_logger()
    check_task_name(name)
    path = Path(root) / params_path
    first = load_params(path, overrides)
    layout = _layout(first, root)
    _tracker(first, layout)  # a tracking server that is down fails here, before any work
    with file_lock(layout.locks / "stream.lock", blocking=True, timeout=STREAM_LOCK_WAIT_S) as held:
        if not held:
            raise TimeoutError(f"task {name}: another run held the stream for {STREAM_LOCK_WAIT_S:.0f}s")
        before = load_params(path, overrides)
        if name in before.tasks and layout.registry(name).is_file():
            version = json.loads(layout.registry(name).read_text()).get("version")
            logger.info("%s is already learned (version %s); nothing to do", name, version)
            return {"task": name, "skipped": "already in the stream", "version": version}
        if name not in before.tasks:
            append_to_stream(path, name, root=root)
            logger.info("appended %s to the stream of %s (on top of %s)", name, path, before.tasks or "nothing")
        params = load_params(path, overrides)
        out = _grow(params, layout)
        rec = out["versions"][params.tasks.index(name)]
        prep = out["prepared"].get(name) or {"bad": None, "summary": f"{name}: prepared by an earlier run"}
        logger.info("%s", prep["summary"])
        base = params.tasks[: params.tasks.index(name)]
        return {"task": name, "base": base, "quarantined": prep["bad"], **rec}


def new_tasks(params: Params, root: str) -> list[str]:
    """Task folders under data.root that are not in the stream yet (valid names), in name order."""
    from lorax.data.layouts import list_tasks

    found = list_tasks(_layout(params, root).data_root)
    return [t for t in found if t not in params.tasks and is_task_name(t)]


@task(name="scan-inbox", cache_policy=NO_CACHE, tags=[GPU_TAG])
def run_scan_inbox(params: Params, root: str, params_path: str, inbox: str) -> dict[str, Any]:
    """``lorax scan`` with the champion: group the inbox images that look fake but match no known generator into
    candidate task folders (CDDB layout) under ``reports/scan/<time>/`` for a person to confirm."""
    import time

    from lorax.serving.scan import scan_inbox
    from pipelines.serving.download import load_predictor

    predictor = load_predictor(f"models:/{params.tracking.registered_model}@champion", Path(root) / params_path,
                               device=params.train.device)
    out = _layout(params, root).root / "reports" / "scan" / time.strftime("%Y%m%d-%H%M%S")
    summary = scan_inbox(predictor, [inbox], out)
    get_run_logger().info("inbox %s: %d images, %d flagged as unknown generator, candidates %s -> %s", inbox,
                          summary["n_images"], summary["n_flagged"],
                          [c["name"] for c in summary["candidates"]] or "none", out)
    return {**summary, "out": str(out)}


@flow(name="lorax-watch", log_prints=True)
def watch_flow(params_path: str = "params.yaml", root: str = ".", overrides: dict[str, Any] | None = None,
               inbox: str | None = None) -> dict[str, Any]:
    """Learn every new task folder under data.root, one at a time in name order; one watch run per project.

    With ``inbox`` (a folder of unlabelled images), the champion then scans it and reports candidate new
    generators (``lorax scan``)."""
    logger = get_run_logger()
    params = load_params(Path(root) / params_path, overrides)
    layout = _layout(params, root)
    _tracker(params, layout)
    with file_lock(layout.locks / "watch.lock") as held:
        if not held:
            logger.info("another watch run is in progress for %s; this one does nothing", Path(root).resolve())
            return {"skipped": "another watch run holds the lock", "trained": []}
        trained: list[dict[str, Any]] = []
        failed: dict[str, str] = {}
        while True:
            todo = [t for t in new_tasks(load_params(Path(root) / params_path, overrides), root) if t not in failed]
            if not todo:
                break
            logger.info("new task folders (in order): %s", todo)
            try:
                trained.append(new_generator_flow(todo[0], params_path, root, overrides))
            except Exception as e:  # noqa: BLE001 - one bad folder must not block the others
                logger.error("%s failed: %s", todo[0], e)
                failed[todo[0]] = str(e)
        if failed:
            raise RuntimeError(f"watch: {len(failed)} new task(s) failed: " +
                               "; ".join(f"{k}: {v}" for k, v in failed.items()))
        result: dict[str, Any] = {"trained": trained}
        if inbox:
            result["scan"] = run_scan_inbox(params, root, params_path, inbox)
        return result


@flow(name="lorax-detect", log_prints=True)
def detect_flow(params_path: str = "params.yaml", root: str = ".", overrides: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """The real/fake detector of pipelines/detection/dvc.yaml: train and evaluate it (the project's manifests must
    exist), then register it; ``champion`` moves only behind detect.register_min_ap."""
    params = load_params(Path(root) / params_path, overrides)
    layout = _layout(params, root)
    _tracker(params, layout)  # a tracking server that is down fails here, before any work
    return {"detect": run_detect(params, layout), "version": run_register_detector(params, layout)}


# ------------------------------------------------------------------------------------------------ CLI
def watch_deployment(params_path: str, root: str, every_s: int):
    """The watch flow as a deployment on an interval schedule (what ``lorax schedule`` serves)."""
    return watch_flow.to_deployment(name="lorax-watch", interval=every_s,
                                    parameters={"params_path": params_path, "root": str(Path(root).resolve())})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flows", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("continual", help="the whole stream of params.yaml")
    n = sub.add_parser("new", help="append one task folder to the stream and learn it on top of the chain")
    n.add_argument("name")
    w = sub.add_parser("watch", help="learn the task folders under data.root that are not in the stream yet")
    w.add_argument("--inbox", help="then scan this folder of unlabelled images for unknown generators")
    sub.add_parser("detect", help="train, evaluate and register the real/fake detector (detect section)")
    s = sub.add_parser("serve", help="serve the watch flow on an interval schedule (needs a Prefect server)")
    s.add_argument("--every", default="1h", help="interval: 90, 30s, 15m, 1h, 1d (default 1h)")
    args = parser.parse_args(argv)
    from pipelines.summary_table import format_result

    if args.cmd == "continual":
        print(format_result(continual_flow(args.params, args.root)))
    elif args.cmd == "new":
        print(format_result(new_generator_flow(args.name, args.params, args.root)))
    elif args.cmd == "detect":
        print(format_result(detect_flow(args.params, args.root)))
    elif args.cmd == "watch":
        print(format_result(watch_flow(args.params, args.root, inbox=args.inbox)))
    else:
        from prefect import serve

        serve(watch_deployment(args.params, args.root, parse_every(args.every)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
