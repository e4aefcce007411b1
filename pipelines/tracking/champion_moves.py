"""Moving the champion by hand: ``lorax models promote VERSION`` and ``lorax models rollback``.

The gate decides on figures; a person may know better (a field report, a set the gate does not see). Every move
keeps its reason where the next person looks: a tag on the version that gains the alias (``promoted``) and on the one
that loses it (``demoted``), and a section appended to the new champion's model card.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pipelines.tracking.model_registry import CHAMPION, _version_record, champion, list_versions

log = logging.getLogger(__name__)


def move_champion(tracker, version: int, reason: str, *, action: str) -> dict[str, Any]:
    """Point ``champion`` at ``version`` by hand (``lorax models promote`` / ``rollback``): the reason is a tag on
    the version that gains the alias (``promoted``) and on the one that loses it (``demoted``), and a section of
    the new champion's model card. Returns the new champion's record."""
    import time

    from mlflow.exceptions import MlflowException

    if not reason.strip():
        raise ValueError(f"{action}: give the reason (--reason '...'); it is recorded with the version")
    client, name = tracker.client, tracker.params.tracking.registered_model
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        known = [v["version"] for v in list_versions(client, name)]
        raise ValueError(f"{name} has no version {version} (versions: {known or 'none'}); "
                         "see `lorax models list`") from None
    before = champion(client, name)
    if before is not None and before["version"] == int(version):
        raise ValueError(f"version {version} is already the champion of {name}")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    note = f"{action} {stamp}: {reason.strip()}"[:4900]
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "promoted", note)
    client.set_model_version_tag(name, str(version), "champion_before", str(before["version"]) if before else "")
    if before is not None:
        client.set_model_version_tag(name, str(before["version"]), "demoted",
                                     f"{action} to v{version} {stamp}: {reason.strip()}"[:4900])
    _append_to_card(tracker, mv, f"\n## {action.capitalize()}\n\n{note} (champion before: "
                                 f"{'v' + str(before['version']) if before else 'none'})\n")
    log.info("%s: champion of %s is now version %s (was %s): %s", action, name, version,
             before["version"] if before else None, reason)
    return _version_record(client.get_model_version(name, str(version)))


def rollback_target(client, name: str) -> int:
    """The version ``lorax models rollback`` returns to: the one the current champion replaced."""
    cur = champion(client, name)
    if cur is None:
        raise ValueError(f"{name} has no champion to roll back")
    prev = cur.get("champion_before")
    if not prev:
        raise ValueError(f"champion v{cur['version']} of {name} replaced no other version; name one with "
                         "`lorax models promote VERSION --reason ...`")
    return int(prev)


def _append_to_card(tracker, mv, section: str) -> None:
    """Add ``section`` to the version's model card, stored again in its run (the card is a report: a failure is
    logged, the alias has moved either way)."""
    artifact_path = (mv.tags or {}).get("artifact_path")
    if not artifact_path:
        log.warning("version %s has no artifact_path tag (registered by an older lorax): card not updated", mv.version)
        return
    import mlflow

    try:
        with tempfile.TemporaryDirectory() as tmp:
            card = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{mv.source.rstrip('/')}/card/model_card.md", dst_path=tmp))
            with open(card, "a") as fh:
                fh.write(section)
            tracker.log_artifact(mv.run_id, card, f"{artifact_path}/card")
    except Exception as err:  # noqa: BLE001
        log.warning("model card of version %s not updated: %s", mv.version, err)
