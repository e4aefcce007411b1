"""The model registry: a version of ``lorax-attributor`` after every task, and the ``champion`` alias behind a gate.

Each version is a pyfunc model (:mod:`pipelines.serving.pyfunc`) logged in the task's run, tagged with the scenario,
its tasks, its accuracies and the result of the quality gate. ``champion`` moves to a new version only when the
gate passes against the current champion:

* the version covers every task of the champion (a model that cannot name a generator the champion knows is a
  regression, whatever its average);
* its average accuracy on the champion's tasks is not below the champion's AAF by more than
  ``tracking.gate.aaf_tolerance`` points (the same tasks on both sides: a newly added task does not count for
  or against the old ones);
* no task of the champion drops by more than ``tracking.gate.max_task_drop`` points.

A failed version is tagged ``gate=failed`` with ``gate_reason``. Registration is idempotent: a version of the
same run and state (``state_id``) is returned instead of registering it twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorax.config import GateConfig

log = logging.getLogger(__name__)

CHAMPION = "champion"

Record = Callable[[Any], dict[str, Any]]  # an MLflow ModelVersion -> the plain record a registry hands out


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str


def quality_gate(candidate: dict[str, float], champion: dict[str, float] | None, cfg: GateConfig) -> GateResult:
    """Compare per-task accuracies (%) of a candidate with the champion's; see the module docstring."""
    if not champion:
        return GateResult(True, "first version (no champion yet)")
    missing = [t for t in champion if t not in candidate]
    if missing:
        return GateResult(False, f"does not cover the champion's tasks {missing}")
    common = list(champion)
    cand = sum(candidate[t] for t in common) / len(common)
    champ = sum(champion.values()) / len(champion)
    problems = []
    if cand < champ - cfg.aaf_tolerance:
        problems.append(
            f"average accuracy on the champion's tasks {cand:.2f} is below the champion's AAF {champ:.2f} by "
            f"{champ - cand:.2f} points (> tracking.gate.aaf_tolerance={cfg.aaf_tolerance})"
        )
    drops = {t: champion[t] - candidate[t] for t in common if champion[t] - candidate[t] > cfg.max_task_drop}
    if drops:
        worst = ", ".join(f"{t} -{d:.2f}" for t, d in sorted(drops.items(), key=lambda kv: -kv[1]))
        problems.append(f"tasks dropped by more than tracking.gate.max_task_drop={cfg.max_task_drop} points: {worst}")
    if problems:
        return GateResult(False, "; ".join(problems))
    return GateResult(True, f"average on the champion's tasks {cand:.2f} vs champion AAF {champ:.2f}; no task dropped "
                            f"more than {cfg.max_task_drop} points")


def _version_record(mv) -> dict[str, Any]:
    t = mv.tags or {}
    aaf = t.get("aaf")
    return {
        "version": int(mv.version),
        "aliases": sorted(getattr(mv, "aliases", []) or []),
        "tasks": [x for x in t.get("tasks", "").split(",") if x],
        "aaf": float(aaf) if aaf not in (None, "") else None,
        "gate": t.get("gate"),
        "gate_reason": t.get("gate_reason"),
        "scenario": t.get("scenario"),
        "method": t.get("method"),
        "task_acc": json.loads(t["task_acc"]) if t.get("task_acc") else {},
        "binary_acc": float(t["binary_acc"]) if t.get("binary_acc") else None,
        "state_id": t.get("state_id"),
        "champion_before": int(t["champion_before"]) if t.get("champion_before") else None,
        "run_id": mv.run_id,
        "created": int(mv.creation_timestamp or 0),
        "source": mv.source,
    }


def list_versions(client, name: str) -> list[dict[str, Any]]:
    """All versions of ``name`` (oldest first) as plain records; [] when the model does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    out = []
    for mv in versions:
        if not getattr(mv, "aliases", None):  # some stores leave aliases out of search results
            mv = client.get_model_version(name, mv.version)
        out.append(_version_record(mv))
    return sorted(out, key=lambda r: r["version"])


def champion(client, name: str, record: Record = _version_record) -> dict[str, Any] | None:
    """The version behind ``name``'s champion alias as ``record`` makes it (the detector's registry passes its
    own), or None while no version has passed the gate."""
    from mlflow.exceptions import MlflowException

    try:
        return record(client.get_model_version_by_alias(name, CHAMPION))
    except MlflowException:
        return None


def ensure_model(client, name: str, description: str) -> None:
    """Create the registered model on first use; a concurrent registration that created it meanwhile is fine."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile
            client.get_registered_model(name)


def find_version(client, name: str, filter_string: str, key: str, value: str,
                 record: Record) -> dict[str, Any] | None:
    """The version (among ``filter_string``'s) whose tag ``key`` is ``value``: what keeps registration idempotent."""
    for mv in client.search_model_versions(filter_string):
        if (mv.tags or {}).get(key) == value:
            return record(client.get_model_version(name, mv.version))
    return None


def gate_tags(gate: GateResult, before: dict[str, Any] | None) -> dict[str, str]:
    """The tags every version carries about its gate, so that a failed one says why and whom it did not replace."""
    return {
        "gate": "passed" if gate.passed else "failed",
        "gate_reason": gate.reason[:4900],  # MLflow caps a tag value at 5000 characters
        "champion_before": str(before["version"]) if before else "",
    }


def create_version(client, name: str, run_id: str, artifact_path: str, *, tags: dict[str, str],
                   description: str, gate: GateResult) -> Any:
    """Register ``artifact_path`` of ``run_id`` as a new version of ``name``; move the champion alias to it only
    when ``gate`` passed, so a failed version is kept (for inspection) but never served as the champion."""
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
    if gate.passed:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return mv


def register(
    tracker,
    *,
    task: str,
    tasks: list[str],
    state_dir: str | Path,
    memory_path: str | Path | None,
    eval_result: dict[str, Any],
    run_id: str,
    state_id: str,
    detector: str | Path | None = None,
) -> dict[str, Any]:
    """Log the pyfunc model in ``run_id``, register it as a new version, run the gate, move ``champion``.

    ``detector`` (a ``detector.safetensors``) is bundled into the model, so that serving it reports the detector's
    verdict beside the attribution (:func:`pipelines.serving.pyfunc.save_attributor`)."""
    from pipelines.serving.pyfunc import save_attributor

    client, cfg = tracker.client, tracker.params.tracking
    name = cfg.registered_model
    ensure_model(client, name, "LoRAX continual attributor: real, or made by which known generator. "
                               "Alias 'champion' = the latest version that passed the quality gate.")
    rec = find_version(client, name, f"name='{name}' and run_id='{run_id}'", "state_id", state_id, _version_record)
    if rec is not None:
        log.info("version %s of %s already holds this state; not registering again", rec["version"], name)
        return {**rec, "registered_now": False}

    acc = {t: float(a) for t, a in zip(tasks, eval_result["task_acc"], strict=True)}
    aaf = float(eval_result.get("mean_acc", sum(acc.values()) / len(acc)))
    artifact_path = f"model-{state_id[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_attributor(Path(tmp) / "model", state_dir, memory_path,
                                    metadata={"tasks": tasks, "state_id": state_id}, detector=detector)
        _write_card(state_dir, eval_result, tasks, model_dir / "card")
        tracker.log_artifact(run_id, model_dir, artifact_path)
    before = champion(client, name)
    gate = quality_gate(acc, before["task_acc"] if before else None, cfg.gate)
    tags = {
        "scenario": cfg.scenario,
        "tasks": ",".join(tasks),
        "n_tasks": str(len(tasks)),
        "task": task,
        "method": tracker.params.continual.method,
        "aaf": f"{aaf:.4f}",
        "binary_acc": f"{float(eval_result.get('binary_acc', float('nan'))):.4f}",
        "task_acc": json.dumps(acc),
        "state_id": state_id,
        **gate_tags(gate, before),
    }
    mv = create_version(client, name, run_id, artifact_path, tags=tags, gate=gate,
                        description=f"after task {task} ({len(tasks)} tasks); gate {tags['gate']}")
    log.info("registered %s version %s (tasks %s): gate %s: %s", name, mv.version, tasks, tags["gate"], gate.reason)
    rec = _version_record(client.get_model_version(name, mv.version))
    return {**rec, "registered_now": True}


def _write_card(state_dir: str | Path, eval_result: dict[str, Any], tasks: list[str], out: Path) -> None:
    """The version's model card (markdown + PNGs) inside its model folder, so it travels with the version.

    A card that cannot be drawn (e.g. evaluations of earlier tasks missing) is logged, never a failed registration.
    """
    from pipelines.serving.card import write_model_card

    try:
        write_model_card(state_dir, {**eval_result, "tasks": tasks}, out)
    except Exception as err:  # noqa: BLE001 - the card is a report; the version must still register
        log.warning("model card for %s not written: %s", state_dir, err)


def download_version(version: dict[str, Any], dest: str | Path) -> tuple[Path, Path | None]:
    """Fetch a version's model folder; returns (state dir, memory manifest or None) inside ``dest``."""
    import mlflow
    import yaml

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version["source"], dst_path=str(dest)))
    spec = yaml.safe_load((local / "MLmodel").read_text())
    arts = spec["flavors"]["python_function"].get("artifacts", {})
    state = local / arts["state"]["path"]
    memory = local / arts["memory"]["path"] if "memory" in arts else None
    return state, memory
