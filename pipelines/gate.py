"""The registry gate's evidence: the candidate (the state after a task) and the champion, both run over the
validation images of every task seen, scored by :mod:`lorax.continual.comparison`.

The champion's state is the local one of the chain when it is there (the DVC stream and the flows grow the same
chain, so it usually is), else it is fetched from the registry once into ``cache/registry/``. Both passes go
through the project's feature store, so the old adapters' embeddings, already computed by the evaluation, are
read rather than recomputed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lorax.config import Params
from pipelines.layout import Layout
from pipelines.tracking.model_registry import GateResult, Judge, download_version, quality_gate

log = logging.getLogger(__name__)


def judge(params: Params, layout: Layout, task: str) -> Judge:
    """The gate for the state after ``task``: called with the champion's record (None when there is none)."""
    from pipelines.steps import _index, _state_info

    tasks = params.tasks[: _index(params, task) + 1]
    if _state_info(layout.state(task)).get("tasks") != tasks:
        raise ValueError(f"{layout.state(task)} does not hold tasks {tasks}; re-run its train step")

    def decide(before: dict[str, Any] | None) -> GateResult:
        cfg = params.tracking.gate
        first = quality_gate(None, before["tasks"] if before else None, tasks, cfg)
        if before is None or not first.passed:
            return first
        return quality_gate(compare_with_champion(params, layout, task, before), before["tasks"], tasks, cfg)

    return decide


def compare_with_champion(params: Params, layout: Layout, task: str, before: dict[str, Any]) -> dict[str, Any]:
    """:func:`lorax.continual.comparison.compare`'s figures for the state after ``task`` against ``before``."""
    from lorax.continual.comparison import Truth, compare
    from lorax.continual.evaluation import val_rows
    from pipelines.steps import _index, _manifests

    t0 = time.perf_counter()
    i = _index(params, task)
    tasks = params.tasks[: i + 1]
    manifests = _manifests(params, layout, i)
    val = val_rows([manifests[t] for t in tasks])
    truth = Truth.of(tasks, val["task_index"].to_numpy(), val["class_id"].to_numpy())
    log.info("gate: the state after %s and champion v%s (tasks %s) on %d val images of %s", task,
             before["version"], before["tasks"], len(val), tasks)
    candidate = answers(layout.state(task), val, params, layout, "gate: candidate")
    champion = answers(champion_state(layout, before, params), val, params, layout, f"gate: champion v{before['version']}")
    figures = compare(candidate, champion, truth)
    figures["champion_version"] = before["version"]
    log.info("gate: pooled on the union %.1f (candidate) vs %.1f (champion v%s), %.0f s",
             figures["pooled"]["candidate"], figures["pooled"]["champion"], before["version"],
             time.perf_counter() - t0)
    return figures


def answers(state: Path, val, params: Params, layout: Layout, desc: str):
    """A state's :class:`~lorax.continual.comparison.Answers` on ``val``'s rows (its own settings; the project's
    evaluation settings and feature store)."""
    from lorax.config import parse_params
    from lorax.continual.comparison import Answers
    from lorax.continual.evaluation import predict_verdict
    from lorax.continual.metrics import fake_probability, softmax
    from lorax.continual.state import load_state
    from pipelines.steps import feature_store

    method, info = load_state(state)
    own = parse_params(info["params"], f"{state}/state.json")
    own = own.model_copy(update={"eval": params.eval, "train": params.train})
    logits, fake, thr = predict_verdict(method, val, own, desc=desc, store=feature_store(params, layout))
    probs = softmax(logits)
    return Answers(list(method.tasks), probs, fake_probability(probs) if fake is None else fake, thr)


def champion_state(layout: Layout, before: dict[str, Any], params: Params) -> Path:
    """The champion's state folder: the chain's local one when its content matches, else a copy fetched from the
    registry into ``<cache folder>/registry/<state id>/`` (kept for the next gate; the folder of
    :func:`lorax.features.cache_root`)."""
    from lorax.continual.state import state_hash
    from lorax.features import cache_root

    local = layout.state(before["tasks"][-1])
    if local.is_dir() and before.get("state_id") and state_hash(local) == before["state_id"]:
        return local
    dest = cache_root(params.cache, layout.project) / "registry" / str(before.get("state_id") or before["version"])[:16]
    done = dest / "state.path"
    if done.is_file() and Path(done.read_text()).is_dir():
        return Path(done.read_text())
    log.info("gate: fetching champion v%s from the registry into %s", before["version"], dest)
    state, _ = download_version(before, dest / "model")
    done.write_text(str(state))
    return state
