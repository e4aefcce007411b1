"""The model registry: a version of ``lorax-attributor`` after every task, and the ``champion`` alias behind a gate.

Each version is a pyfunc model (:mod:`pipelines.serving.pyfunc`) logged in the task's run, tagged with the scenario,
its tasks, its accuracies, its parent (the version it was learned on top of) and the result of the quality gate.
The gate asks the user's question: is the candidate better than the champion on everything seen so far? Both are
scored on the validation images of the union of their tasks (:mod:`lorax.continual.comparison`: a model is not
asked to name a generator it never learned), and ``champion`` moves when

* the candidate covers every task of the champion (it could not name a generator the champion knows);
* its pooled accuracy on the union is not below the champion's by more than ``tracking.gate.union_tolerance``;
* no task of the champion drops by more than ``tracking.gate.max_task_drop`` points, measured on the champion's own
  classes (a sibling generator learned since cannot make an old one "drop");
* its real/fake verdict on the champion's tasks does not regress: AP by at most ``tracking.gate.max_ap_drop``, real
  photos called real by at most ``tracking.gate.max_real_drop`` points.

A failed version is tagged ``gate=failed`` with ``gate_reason`` (which number, by how much, how to override) and
the figures (``gate_figures``). ``lorax models promote`` / ``rollback`` move the alias by hand (:mod:`pipelines.tracking.champion_moves`), with the reason in
a tag and in the version's model card. Registration is idempotent: a version of the same run and state
(``state_id``) is returned instead of registering it twice.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.config import GateConfig

log = logging.getLogger(__name__)

CHAMPION = "champion"

Record = Callable[[Any], dict[str, Any]]  # an MLflow ModelVersion -> the plain record a registry hands out
Judge = Callable[[dict[str, Any] | None], "GateResult"]  # the champion's record (or None) -> the gate's decision


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def override_hint(cfg_key: str | None = None) -> str:
    """How a person overrides a refusal: by hand, or with a looser setting."""
    hint = "to override: `lorax models promote VERSION --reason ...`"
    return hint + (f", or relax tracking.gate.{cfg_key} in params.yaml" if cfg_key else "")


def quality_gate(figures: dict[str, Any] | None, champion_tasks: list[str] | None, candidate_tasks: list[str],
                 cfg: GateConfig) -> GateResult:
    """Decide on :func:`lorax.continual.comparison.compare`'s figures. ``champion_tasks`` None: there is no
    champion yet; ``figures`` None: only the coverage rule is checked (callers that compared nothing)."""
    if champion_tasks is None:
        return GateResult(True, "first version (no champion yet)")
    missing = [t for t in champion_tasks if t not in candidate_tasks]
    if missing:
        return GateResult(False, f"does not cover the champion's tasks {missing}: it cannot name those generators; "
                                 + override_hint())
    if figures is None:
        return GateResult(True, "covers the champion's tasks (no comparison of the two models was made)")
    problems = []
    cand, champ = figures["pooled"]["candidate"], figures["pooled"]["champion"]
    if cand < champ - cfg.union_tolerance:
        problems.append(f"pooled accuracy on the union of the tasks {cand:.1f} is below the champion's {champ:.1f} "
                        f"by {champ - cand:.1f} points (> tracking.gate.union_tolerance={cfg.union_tolerance}; "
                        + override_hint("union_tolerance") + ")")
    drops = {t: f["champion"] - f["candidate"] for t, f in figures["task"].items()
             if f["champion"] - f["candidate"] > cfg.max_task_drop}
    if drops:
        worst = ", ".join(f"{t} -{d:.1f}" for t, d in sorted(drops.items(), key=lambda kv: -kv[1]))
        problems.append(f"on the champion's own classes, tasks dropped by more than tracking.gate.max_task_drop="
                        f"{cfg.max_task_drop} points: {worst} (" + override_hint("max_task_drop") + ")")
    for key, what, limit in (("ap", "verdict AP", "max_ap_drop"), ("real_acc", "real photos called real",
                                                                   "max_real_drop")):
        c, h = figures[key]["candidate"], figures[key]["champion"]
        tol = getattr(cfg, limit)
        if not (math.isnan(c) or math.isnan(h)) and c < h - tol:
            problems.append(f"{what} on the champion's tasks {c:.1f} vs the champion's {h:.1f}: -{h - c:.1f} points "
                            f"(> tracking.gate.{limit}={tol}; " + override_hint(limit) + ")")
    if problems:
        return GateResult(False, "; ".join(problems), figures)
    return GateResult(True, f"pooled accuracy on the union {cand:.1f} vs the champion's {champ:.1f}; no task of the "
                            f"champion dropped more than {cfg.max_task_drop} points on its own classes; verdict AP "
                            f"{figures['ap']['candidate']:.1f} vs {figures['ap']['champion']:.1f}", figures)


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
        "parent": int(t["parent_version"]) if t.get("parent_version") else None,
        "gate_figures": json.loads(t["gate_figures"]) if t.get("gate_figures") else None,
        "promoted": t.get("promoted"),
        "demoted": t.get("demoted"),
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
        "gate_figures": json.dumps(_rounded(gate.figures))[:4900] if gate.figures else "",
    }


def _rounded(x: Any) -> Any:
    """Figures with one decimal (tags are for people; NaN stays NaN)."""
    if isinstance(x, float):
        return round(x, 2)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


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
    judge: Judge | None = None,
    parent: int | None = None,
) -> dict[str, Any]:
    """Log the pyfunc model in ``run_id``, register it as a new version, run the gate, move ``champion``.

    ``judge`` compares the candidate with the champion's record (:func:`pipelines.gate.judge`: both models on the
    union's validation images); without one only the coverage rule applies. ``parent``: the version this one was
    learned on top of (``lorax models list`` shows the chain). ``detector`` (a ``detector.safetensors``) is bundled
    into the model, so that serving it reports the detector's verdict beside the attribution
    (:func:`pipelines.serving.pyfunc.save_attributor`)."""
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
    before = champion(client, name)
    gate = judge(before) if judge is not None else quality_gate(None, before and before["tasks"], tasks, cfg.gate)
    artifact_path = f"model-{state_id[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_attributor(Path(tmp) / "model", state_dir, memory_path,
                                    metadata={"tasks": tasks, "state_id": state_id}, detector=detector)
        _write_card(state_dir, eval_result, tasks, model_dir / "card", gate)
        tracker.log_artifact(run_id, model_dir, artifact_path)
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
        "parent_version": str(parent) if parent else "",
        "artifact_path": artifact_path,
        **gate_tags(gate, before),
    }
    mv = create_version(client, name, run_id, artifact_path, tags=tags, gate=gate,
                        description=f"after task {task} ({len(tasks)} tasks); gate {tags['gate']}")
    log.info("registered %s version %s (tasks %s): gate %s: %s", name, mv.version, tasks, tags["gate"], gate.reason)
    rec = _version_record(client.get_model_version(name, mv.version))
    return {**rec, "registered_now": True}


def _write_card(state_dir: str | Path, eval_result: dict[str, Any], tasks: list[str], out: Path,
                gate: GateResult | None = None) -> None:
    """The version's model card (markdown + PNGs) inside its model folder, so it travels with the version; the
    gate's decision and figures are its last section.

    A card that cannot be drawn (e.g. evaluations of earlier tasks missing) is logged, never a failed registration.
    """
    from pipelines.serving.card import write_model_card

    try:
        card = write_model_card(state_dir, {**eval_result, "tasks": tasks}, out)
        if gate is not None:
            with open(card, "a") as fh:
                fh.write(gate_section(gate))
    except Exception as err:  # noqa: BLE001 - the card is a report; the version must still register
        log.warning("model card for %s not written: %s", state_dir, err)


def gate_section(gate: GateResult) -> str:
    """The card's markdown about the gate: the decision, why, and the figures side by side."""
    lines = ["", "## Registry gate", "", f"**{'passed' if gate.passed else 'failed'}**: {gate.reason}", ""]
    f = gate.figures
    if f:
        lines += ["| figure | candidate | champion |", "|---|---|---|",
                  f"| pooled accuracy on {', '.join(f['union_tasks'])} | {f['pooled']['candidate']:.1f} | "
                  f"{f['pooled']['champion']:.1f} |"]
        lines += [f"| {t} (on the champion's classes) | {v['candidate']:.1f} | {v['champion']:.1f} |"
                  for t, v in f["task"].items()]
        lines += [f"| verdict AP on the champion's tasks | {f['ap']['candidate']:.1f} | {f['ap']['champion']:.1f} |",
                  f"| real photos called real | {f['real_acc']['candidate']:.1f} | {f['real_acc']['champion']:.1f} |",
                  ""]
    return "\n".join(lines) + "\n"


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
