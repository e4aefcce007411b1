"""The detector's registered model (``detect.registered_model``, default ``lorax-detector``), apart from the attributor's.

Each version is a detector checkpoint (``detector.safetensors``: trained tensors + the settings that rebuild the
frozen backbone; never a pickle) in the MLflow run that trained it, tagged with its method, training generators,
figures and the result of its gate. ``champion`` moves to a new version only when the gate passes:

* the detector's mean AP (percent) on the val split of its training generators (metrics.json ``seen``, the
  figures the threshold was fitted on) is at least ``detect.register_min_ap``.

That is a floor on the detector being usable at all, not a transfer measure: unseen generators are what
``map`` (also a tag) reports, and a user compares those before trusting a detector on new generators. A version that
fails is registered all the same, tagged ``gate=failed`` with ``gate_reason``, and the previous champion stays.
Registration is idempotent: a version holding the same checkpoint (``detector_id``, its SHA-256) is returned
instead of registering it twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pipelines.tracking.model_registry import (
    GateResult,
    champion,
    create_version,
    ensure_model,
    find_version,
    gate_tags,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"  # where a detect run keeps detector.safetensors (pipelines/detect_runs.py)
ID_TAG = "lorax.detector_id"  # the detect run's tag: the SHA-256 of the checkpoint it logged


def detector_id(checkpoint: str | Path) -> str:
    """The checkpoint's SHA-256: what makes two registrations the same version."""
    h = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seen_map(metrics: dict[str, Any]) -> float | None:
    """Mean AP (percent) over the training generators' val split (None when no generator has one)."""
    aps = [m["ap"] for m in (metrics.get("seen") or {}).values() if m.get("ap") is not None]
    return sum(aps) / len(aps) if aps else None


def detector_gate(metrics: dict[str, Any], min_ap: float) -> GateResult:
    """Pass when the training generators' mean val AP is at least ``min_ap`` (``detect.register_min_ap``)."""
    ap = seen_map(metrics)
    if ap is None:
        return GateResult(False, "metrics.json has no AP on the training generators' val split ('seen'); re-run the "
                                 "detect step (it needs real and fake val images of each training generator)")
    per = ", ".join(f"{t} {m['ap']:.2f}" for t, m in metrics["seen"].items() if m.get("ap") is not None)
    if ap < min_ap:
        return GateResult(False, f"mean AP on the training generators' val split {ap:.2f} ({per}) is below "
                                 f"detect.register_min_ap={min_ap:g}; the previous champion stays (train longer or "
                                 "on more images, or lower detect.register_min_ap in params.yaml)")
    return GateResult(True, f"mean AP on the training generators' val split {ap:.2f} ({per}) >= "
                            f"detect.register_min_ap={min_ap:g}")


def _record(mv) -> dict[str, Any]:
    t = mv.tags or {}

    def num(key: str) -> float | None:
        return float(t[key]) if t.get(key) not in (None, "") else None

    return {
        "name": mv.name,
        "version": int(mv.version),
        "aliases": sorted(getattr(mv, "aliases", []) or []),
        "method": t.get("method"),
        "train_tasks": [x for x in t.get("train_tasks", "").split(",") if x],
        "seen_map": num("seen_map"),
        "map": num("map"),
        "threshold": num("threshold"),
        "gate": t.get("gate"),
        "gate_reason": t.get("gate_reason"),
        "detector_id": t.get("detector_id"),
        "champion_before": int(t["champion_before"]) if t.get("champion_before") else None,
        "run_id": mv.run_id,
        "source": mv.source,
    }


def detector_champion(client, name: str) -> dict[str, Any] | None:
    """The detector version behind ``name``'s champion alias, or None while none has passed the gate."""
    return champion(client, name, _record)


def _run_holding(tracker, experiment: str, did: str) -> str | None:
    """The detect run that logged this checkpoint (tagged with its id), if it is in this store."""
    exp = tracker.client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = tracker.client.search_runs([exp.experiment_id], f"tags.`{ID_TAG}` = '{did}'", max_results=1)
    return runs[0].info.run_id if runs else None


def register_detector(tracker, checkpoint: str | Path, metrics: dict[str, Any], *, experiment: str,
                      min_ap: float, name: str) -> dict[str, Any]:
    """Register ``checkpoint`` as a version of ``name``, run the gate, move ``champion`` only if it passes.

    The version's source is the ``checkpoint/`` folder of the detect run that logged it (found by its
    :data:`ID_TAG`); a checkpoint trained without tracking gets a run of its own in ``experiment``.
    """
    client = tracker.client
    checkpoint = Path(checkpoint)
    did = detector_id(checkpoint)
    ensure_model(client, name, "LoRAX real/fake detector (CLIP-MoLE or a baseline): is an image made by any "
                               "generator, seen or not. Alias 'champion' = the latest version that passed the gate "
                               "(detect.register_min_ap). Use: lorax predict --detector models:/NAME@champion.")
    rec = find_version(client, name, f"name='{name}'", "detector_id", did, _record)
    if rec is not None:
        log.info("version %s of %s already holds this detector; not registering again", rec["version"], name)
        return {**rec, "registered_now": False}
    if tracker.experiment != experiment:
        tracker.experiment, tracker._experiment_id = experiment, None
    run_id = _run_holding(tracker, experiment, did)
    if run_id is None:  # trained untracked (`lorax detect` without --track, or a store that came later)
        run = client.create_run(tracker.experiment_id, run_name=f"register-{metrics.get('method', 'detector')}",
                                tags={"lorax.kind": "detect", ID_TAG: did})
        run_id = run.info.run_id
        tracker.log_artifact(run_id, checkpoint, CHECKPOINT_DIR)
        tracker.log_dict(run_id, metrics, "metrics.json")
        tracker.finish(run_id)
    before = detector_champion(client, name)
    gate = detector_gate(metrics, min_ap)
    ap = seen_map(metrics)
    tags = {
        "method": str(metrics.get("method", "")),
        "backbone": str(metrics.get("backbone", "")),
        "train_tasks": ",".join(metrics.get("train_tasks") or []),
        "eval_tasks": ",".join(metrics.get("eval_tasks") or []),
        "seen_map": f"{ap:.4f}" if ap is not None else "",
        "map": f"{metrics['map']:.4f}" if metrics.get("map") is not None else "",
        "threshold": repr(float(metrics["threshold"])) if metrics.get("threshold") is not None else "",
        "seen_ap": json.dumps({t: m.get("ap") for t, m in (metrics.get("seen") or {}).items()}),
        "detector_id": did,
        **gate_tags(gate, before),
    }
    mv = create_version(client, name, run_id, CHECKPOINT_DIR, tags=tags, gate=gate,
                        description=f"{tags['method']} trained on {tags['train_tasks']}; gate {tags['gate']}")
    if gate.passed:
        log.info("registered %s version %s: gate passed (%s); it is the champion", name, mv.version, gate.reason)
    else:
        log.warning("registered %s version %s: gate FAILED, champion stays %s: %s", name, mv.version,
                    f"version {before['version']}" if before else "unset", gate.reason)
    return {**_record(client.get_model_version(name, mv.version)), "registered_now": True}
