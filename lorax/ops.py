"""The pipeline's steps, written once: DVC stages (``python -m pipelines.<stage>``) and Prefect flows
(``pipelines/flows.py``) are two thin drivers of these functions. Nothing here imports DVC or Prefect.

Paths of a project (relative to its root; :class:`Layout`)::

    data/synth/<task>.json          synth: what was synthesised (or that data.source is folder)
    <data.root>/<task>/             the task's images (the zoo writes them here)
    <data.manifests>/<task>.parquet prepare (+ <task>.quarantine.csv)
    state/init/stream.json          init: the stream's MLflow parent run (passed explicitly to every task)
    state/<task>/                   train: the model after the task (adapters, heads, state.json)
    memory/<task>.parquet           select: exemplar memory after the task (memory/init.parquet is empty)
    reports/eval/<task>.json        evaluate: one column of the accuracy matrix (+ .predictions.csv)
    reports/registry/<task>.json    register: the registered version and its gate result
    reports/metrics.json            report: the keys of ``lorax train``'s metrics.json; reports/plots/*
    flows/...                       the same layout, for the flows that grow the champion (:meth:`Layout.flows`)

Every step skips work whose output is already complete and current (a Prefect retry never redoes a finished
step; an interrupted training resumes from its last epoch checkpoint in ``state/<task>.partial/``). DVC removes a
stage's outputs before running it, so under DVC the steps always run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorax.config import ConfigError, Params, load_params, params_to_dict, parse_params
from lorax.utils.io import read_json, write_json
from lorax.continual.state import state_hash

log = logging.getLogger(__name__)

INIT = "init"
RUN_FILE = "mlflow_run.json"  # in state/<task>.partial/: the task's run id while it trains (resume continues it)


# ----------------------------------------------------------------------------------------------- paths
FLOWS_DIR = "flows"  # under the project root: the champion-growing flows' own state/, memory/, reports/, manifests


@dataclass(frozen=True)
class Layout:
    """Where every step reads and writes, for one project root.

    ``root`` holds the step outputs (state/, memory/, reports/); ``project`` is the project root, whose data,
    tracking store and embedding store every layout of the project shares (equal to ``root`` except in
    :meth:`flows`)."""

    root: Path
    data_root: Path
    manifests: Path
    project: Path

    @classmethod
    def from_params(cls, params: Params, root: str | Path = ".") -> Layout:
        root = Path(root).resolve()
        return cls(root, root / params.data.root, root / params.data.manifests, root)

    @classmethod
    def flows(cls, params: Params, root: str | Path = ".") -> Layout:
        """The layout of the flows that learn a task on top of the registered champion (``new``, ``watch``).

        Their chain is the champion's, not params.yaml's stream, so their outputs live in ``<root>/flows/``
        (the same tree inside): DVC's outputs, which are keyed by task name too, are never overwritten by a chain
        DVC did not make (it would see them modified and redo those stages). Images, the MLflow store and the
        embedding store stay the project's."""
        root = Path(root).resolve()
        work = root / FLOWS_DIR
        return cls(work, root / params.data.root, work / Path(params.data.manifests).name, root)

    def synth_marker(self, task: str) -> Path:
        return self.root / "data" / "synth" / f"{task}.json"

    def manifest(self, task: str) -> Path:
        return self.manifests / f"{task}.parquet"

    def state(self, task: str) -> Path:
        return self.root / "state" / task

    def memory(self, task: str) -> Path:
        return self.root / "memory" / f"{task}.parquet"

    def eval(self, task: str) -> Path:
        return self.root / "reports" / "eval" / f"{task}.json"

    def registry(self, task: str) -> Path:
        return self.root / "reports" / "registry" / f"{task}.json"

    @property
    def stream_file(self) -> Path:
        return self.state(INIT) / "stream.json"

    @property
    def metrics(self) -> Path:
        return self.root / "reports" / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.root / "reports" / "plots"

    @property
    def locks(self) -> Path:
        """Lock files live outside the project (DVC hashes state/ and reports/); one folder per project root."""
        key = hashlib.sha1(str(self.project).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / "lorax-locks" / key


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


def stream_run(layout: Layout, prev: str) -> dict[str, Any]:
    """The tracking ids a task inherits from its predecessor (``state/init/stream.json`` for the first task)."""
    if prev == INIT:
        return read_json(layout.stream_file, "run the init stage (`dvc repro init`) first")
    return dict(_state_info(layout.state(prev)).get("tracking") or {})


def embedding_store(params: Params, layout: Layout):
    """The project's store of frozen adapters' embeddings (``eval.embedding_cache``), or None."""
    from lorax.continual.embedding_store import EmbeddingStore

    return EmbeddingStore.from_params(params, layout.project)


# ----------------------------------------------------------------------------------------------- steps
def init_step(params: Params, layout: Layout, tracker=None) -> Path:
    """Start a stream: its MLflow parent run (if tracking), the empty memory and the registry chain's root."""
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
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

    return load_stream_manifests(layout.manifests, params.tasks[: upto + 1])


def train_step(params: Params, layout: Layout, task: str, tracker=None) -> Path:
    """Train one task on top of its predecessor's state; resumes an interrupted attempt (and its MLflow run)."""
    i = _index(params, task)
    tasks, prev = params.tasks, params.stream[task].prev
    out = layout.state(task)
    if _is_complete_state(out, tasks[: i + 1]):
        log.info("task %s: state %s is complete; skipped", task, out)
        return out
    from lorax.continual.memory import ExemplarMemory
    from lorax.continual.trainer import train_task

    prev_state = None if prev == INIT else layout.state(prev)
    if prev_state is not None and not _is_complete_state(prev_state, tasks[:i]):
        raise FileNotFoundError(f"{prev_state}: the state after {prev!r} (tasks {tasks[:i]}) is missing or from "
                                f"another stream; train {prev!r} first")
    manifests = _manifests(params, layout, i)
    prev_mem = layout.memory(prev)
    memory = ExemplarMemory.load(prev_mem) if prev_mem.is_file() else None
    ids = stream_run(layout, prev)
    parent, run_id = ids.get("parent_run_id"), None
    partial = out.with_name(out.name + ".partial")
    if tracker is not None and parent:
        tracker.require_run(parent, str(layout.stream_file if prev == INIT else prev_state / "state.json"))
        resume = json.loads((partial / RUN_FILE).read_text()).get("run_id") if (partial / RUN_FILE).is_file() else None
        run_id = tracker.start_task(parent, task, i, resume)
        write_json(partial / RUN_FILE, {"run_id": run_id, "parent_run_id": parent})
    tracking = {"parent_run_id": parent, "run_id": run_id, "experiment_id": ids.get("experiment_id"),
                "tracking_uri": tracker.uri if tracker else ids.get("tracking_uri")}
    try:
        train_task(prev_state, manifests[task], memory, params, out, history=[manifests[t] for t in tasks[:i]],
                   callback=tracker.epoch_callback(run_id) if run_id else None, extra_info={"tracking": tracking})
    except BaseException as e:
        if run_id:
            with contextlib.suppress(Exception):
                tracker.finish(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if run_id:
        info = _state_info(out)
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
    from lorax.continual.trainer import select_exemplars

    method, _ = load_state(state, params=params)
    prev_mem = layout.memory(params.stream[task].prev)
    memory = ExemplarMemory.load(prev_mem) if prev_mem.is_file() else None
    mem = select_exemplars(method, _manifests(params, layout, i)[task], memory, params,
                           store=embedding_store(params, layout))
    mem.save(out)
    log.info("task %s: memory %d exemplars %s -> %s", task, len(mem), mem.class_counts(), out)
    return out


def evaluate_step(params: Params, layout: Layout, task: str) -> dict[str, Any]:
    """Accuracy on the validation images of every task seen so far (one column of the accuracy matrix), and the
    state's open-set calibration, from one pass of the model over those images."""
    i = _index(params, task)
    tasks = params.tasks[: i + 1]
    state, out = layout.state(task), layout.eval(task)
    sid = state_hash(state) if state.is_dir() else None
    if out.is_file() and sid is not None and read_json(out).get("state_id") == sid:
        log.info("task %s: evaluation %s is current; skipped", task, out)
        calibrate_openset(params, layout, task)  # a no-op when current
        return read_json(out)
    from lorax.continual.state import load_state
    from lorax.continual.trainer import evaluate_controls, predict_logits, score_val, val_rows

    info = _state_info(state)
    if info.get("tasks") != tasks:
        raise ValueError(f"{state}: holds tasks {info.get('tasks')}, expected {tasks}; re-run the train step")
    method, loaded_info = load_state(state, params=params)
    manifests = _manifests(params, layout, i)
    val = val_rows([manifests[t] for t in tasks])
    store = embedding_store(params, layout)
    logits, val_feats = predict_logits(method, val, params, features=True, store=store)
    result, table = score_val(val, logits, tasks)
    result.update(task=task, task_index=i, tasks=tasks, state_id=sid)
    control = evaluate_controls(method, val, params, store=store)  # eval.resample_control: {} when off
    if control:
        result["control"] = control
    calibrate_openset(params, layout, task, loaded=(method, manifests, val_feats, store))  # this pass's features
    write_json(out, result)
    table.to_csv(out.with_suffix(".predictions.csv"), index=False)
    log.info("task %s: accuracy per task %s, mean %.2f, binary %.2f", task,
             {t: round(a, 2) for t, a in zip(tasks, result["task_acc"], strict=True)}, result["mean_acc"],
             result["binary_acc"])
    return result


def _log_evaluation(tracker, ids: dict[str, Any], task: str, i: int, ev: dict[str, Any], path: Path) -> None:
    """The evaluation column in the task's run, and the per-task curves (``acc.<task>`` at step = tasks trained - 1)
    in the stream's run. Logged at registration, the stage that talks to MLflow anyway."""
    acc = {f"acc.{t}": a for t, a in zip(ev["tasks"], ev["task_acc"], strict=True)}
    tracker.log_metrics(ids["run_id"], {**acc, "mean_acc": ev["mean_acc"], "binary_acc": ev["binary_acc"],
                                        "mean_ap": ev["mean_ap"]}, step=i)
    tracker.log_artifact(ids["run_id"], path, "eval")
    if ids.get("parent_run_id"):
        tracker.log_metrics(ids["parent_run_id"], {**acc, "avg_acc": ev["mean_acc"]}, step=i)


def calibrate_openset(params: Params, layout: Layout, task: str,
                      loaded: tuple[Any, dict[str, Any], Any, Any] | None = None) -> Path:
    """The state's open-set calibration (``state/<task>.openset``), made once per state, so the registered
    version reports an unknown-generator score and flag (``lorax predict``, the served model, ``lorax scan``).

    The evaluate step passes what it has ``loaded``: (method, manifests, the val rows' super-features from its
    evaluation pass, its embedding store), so only the calibration's train sample goes through the model here. Without it (a caller
    outside the evaluate step), the state is loaded and calibrated through the Predictor."""
    from lorax.serving import openset
    from lorax.serving.calibration import calibrate_state

    state = layout.state(task)
    out = openset.openset_dir(state)
    if openset.current_openset(state, out) is not None:
        return out
    if loaded is None:
        return calibrate_state(state, layout.manifests, out, device=params.train.device)
    from lorax.continual.trainer import predict_logits

    method, manifests, val_feats, store = loaded
    tasks = list(method.tasks)
    openset.check_manifests(layout.manifests, tasks)
    rows = openset.calibration_rows(manifests, tasks, "train", openset.MAX_PER_CLASS, seed=0)
    _, train_feats = predict_logits(method, rows, params, features=True, desc="open-set train", store=store)
    stats = openset.calibration_from_features(train_feats, rows["class_id"].to_numpy(), val_feats, tasks,
                                              params.eval.crops)
    return openset.store_calibration(stats, state, layout.manifests, out)


def register_step(params: Params, layout: Layout, task: str, tracker) -> dict[str, Any]:
    """A new version of the registered model after the task; ``champion`` moves only if the gate passes."""
    from lorax.tracking import registry

    i = _index(params, task)
    state = layout.state(task)
    info = _state_info(state)
    ev = read_json(layout.eval(task), f"evaluate task {task} first")
    sid = state_hash(state)
    if ev.get("state_id") != sid:
        raise ValueError(f"{layout.eval(task)} evaluates another state than {state}; re-run the evaluate step")
    calibrate_openset(params, layout, task)
    ids = dict(info.get("tracking") or {})
    run_id = ids.get("run_id")
    if not run_id:  # trained without tracking: give the version a run of its own in the stream
        parent = stream_run(layout, params.stream[task].prev).get("parent_run_id") or tracker.start_stream(params.tasks)
        run_id = tracker.start_task(parent, task, i)
        ids.update(run_id=run_id, parent_run_id=parent)
    _log_evaluation(tracker, ids, task, i, ev, layout.eval(task))
    rec = registry.register(tracker, task=task, tasks=info["tasks"], state_dir=state, memory_path=layout.memory(task),
                            eval_result=ev, run_id=run_id, state_id=sid)
    tracker.set_tags(run_id, {"lorax.model_version": rec["version"], "lorax.gate": rec["gate"]})
    tracker.finish(run_id)
    # a stable record of the registration (aliases move later; `lorax models list` shows the current ones)
    record = {k: v for k, v in rec.items() if k not in ("aliases", "registered_now")}
    write_json(layout.registry(task), record)
    return rec


def _long_tables(metrics: dict[str, Any]):
    import pandas as pd

    tasks, R = metrics["tasks"], metrics["acc_matrix"]
    rows = [{"task": t, "row": i, "after_task": tasks[j], "step": j, "acc": R[i][j]}
            for i, t in enumerate(tasks) for j in range(len(tasks)) if R[i][j] is not None]
    matrix = pd.DataFrame(rows)
    curves = matrix.drop(columns="row").sort_values(["task", "step"], kind="stable").reset_index(drop=True)
    mean = pd.DataFrame([{"task": "mean", "after_task": tasks[j], "step": j,
                          "acc": sum(R[i][j] for i in range(j + 1)) / (j + 1)} for j in range(len(tasks))])
    return matrix, pd.concat([curves, mean], ignore_index=True)


def report_step(params: Params, layout: Layout, tracker=None) -> dict[str, Any]:
    """reports/metrics.json (the keys of ``lorax train``), plots for DVC and MLflow, the stream run's summary."""
    import numpy as np

    from lorax.continual.plots import plot_accuracy_matrix, plot_task_curves
    from lorax.continual.stream import summarize_stream

    tasks = params.tasks
    evals = [read_json(layout.eval(t), f"evaluate task {t} first") for t in tasks]
    states = [layout.state(t) for t in tasks]
    metrics = summarize_stream(params, evals, states)
    write_json(layout.metrics, metrics)
    matrix, curves = _long_tables(metrics)
    layout.plots.mkdir(parents=True, exist_ok=True)
    matrix.to_csv(layout.plots / "acc_matrix.csv", index=False)
    curves.to_csv(layout.plots / "acc_curves.csv", index=False)
    R = np.array([[np.nan if v is None else v for v in row] for row in metrics["acc_matrix"]])
    plot_accuracy_matrix(R, tasks, layout.plots / "acc_matrix.png")
    plot_task_curves(R, tasks, layout.plots / "task_curves.png")
    parent = (read_json(layout.stream_file).get("parent_run_id") if layout.stream_file.is_file()
              else (_state_info(states[-1]).get("tracking") or {}).get("parent_run_id"))
    if tracker is not None and parent:
        from lorax.tracking.env import dvc_lock_hashes, environment_tags

        tracker.require_run(parent, str(layout.stream_file))
        keys = ("aa", "aaf", "bwt", "forgetting", "binary_acc", "mean_ap")
        tracker.log_metrics(parent, {k: metrics[k] for k in keys if metrics.get(k) is not None}, step=len(tasks) - 1)
        import pandas as pd

        table = pd.DataFrame(metrics["acc_matrix"], columns=tasks)
        table.insert(0, "evaluated \\ after", tasks)
        tracker.log_table(parent, table, f"acc_matrix_{len(tasks)}tasks.json")
        for f in ("acc_matrix.png", "task_curves.png", "acc_matrix.csv", "acc_curves.csv"):
            tracker.log_artifact(parent, layout.plots / f, "plots")
        tracker.log_artifact(parent, layout.metrics)
        tracker.log_artifact(parent, layout.root / "dvc.lock", "dvc")
        tracker.log_dict(parent, dvc_lock_hashes(layout.root), "dvc/lock_hashes.json")
        tracker.set_tags(parent, {"lorax.tasks": ",".join(tasks), **environment_tags(layout.root)})
        tracker.finish(parent)
    log.info("report: %s (AA %.2f, AAF %.2f, BWT %.2f)", layout.metrics, metrics["aa"], metrics["aaf"], metrics["bwt"])
    return metrics


# ----------------------------------------------------------------------------------------------- the stream
def append_to_stream(params_path: str | Path, name: str | None = None, *, root: str | Path = ".") -> str:
    """Append task ``name`` (``None``: the next zoo generator not yet in the stream) to params.yaml's stream.

    The file is edited as text so its comments and layout stay; the result is validated and the file is left
    unchanged if it does not load. Returns the name added.
    """
    path = Path(params_path)
    params = load_params(path)
    tasks = params.tasks
    if name is None:
        left = [g for g in params.zoo.order if g not in tasks]
        if not left:
            raise ConfigError(f"{path}: every zoo generator ({params.zoo.order}) is already in the stream")
        name = left[0]
    if name in tasks:
        raise ConfigError(f"{path}: task {name!r} is already in the stream ({tasks})")
    if name == INIT or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise ConfigError(f"task name {name!r}: use letters, digits, '_', '-', '.' (and not 'init')")
    if params.data.source == "builtin" and name not in params.zoo.order:
        raise ConfigError(
            f"{name!r} is not a zoo generator and data.source is builtin; zoo generators not in the stream yet: "
            f"{[g for g in params.zoo.order if g not in tasks] or 'none'}. To add a folder of your own, set "
            f"data.source: folder and data.root to the dataset"
        )
    if params.data.source == "folder":
        folder = Path(root) / params.data.root / name
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such task folder under data.root; add the images first")
    lines = path.read_text().splitlines(keepends=True)
    try:
        start = next(k for k, ln in enumerate(lines) if re.match(r"^stream\s*:\s*(#.*)?$", ln))
    except StopIteration:
        raise ConfigError(f"{path}: no block 'stream:' at the top level; add one with the first task") from None
    last, indent = None, None
    for k in range(start + 1, len(lines)):
        ln = lines[k]
        if ln.strip() == "" or ln.lstrip().startswith("#"):
            continue
        if not ln[0].isspace():
            break
        if indent is None:
            indent = ln[: len(ln) - len(ln.lstrip())]
        last = k  # the block's last line (a nested line of the last task in block style too)
    if last is None:
        raise ConfigError(f"{path}: the stream block is empty")
    new_line = f"{indent}{name}: {{prev: {tasks[-1]}}}\n"
    if not lines[last].endswith("\n"):
        lines[last] += "\n"
    lines.insert(last + 1, new_line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    try:
        check = load_params(tmp)
    except ConfigError as e:
        tmp.unlink()
        raise ConfigError(f"adding {name!r} would make {path} invalid; left unchanged:\n{e}") from None
    if check.tasks != tasks + [name]:
        tmp.unlink()
        raise ConfigError(f"{path}: could not append {name!r} to the stream block (got {check.tasks}); edit it by hand")
    tmp.replace(path)
    return name


def stream_params(params: Params, tasks: list[str]) -> Params:
    """``params`` with the stream replaced by the chain ``tasks`` (for flows that grow the champion's stream).

    Tasks that are not zoo generators are read from data.root as folders (data.source: folder)."""
    raw = params_to_dict(params)
    raw["stream"] = {t: {"prev": INIT if k == 0 else tasks[k - 1]} for k, t in enumerate(tasks)}
    if raw["data"]["source"] == "builtin" and any(t not in params.zoo.order for t in tasks):
        raw["data"]["source"] = "folder"
    return parse_params(raw, "stream of the champion + new task")


# ----------------------------------------------------------------------------------------------- locks
@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = False, timeout: float = 0.0) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path``: yields True when held, False when another holder has it.

    The lock dies with its process (no stale lock files after a crash) and conflicts between threads too
    (each call opens its own file description).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not blocking or time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
        if held:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        yield held
    finally:
        if held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
