"""A project's own MLflow store belongs to its folder: a copied project (``cp -a``) uses its copy of ``mlflow.db``
and ``mlartifacts/``, never the original's.

MLflow records absolute artifact locations (each experiment's, each run's, each model version's source). In a copy
those still name the original's folder, so runs made in the copy would write their artifacts there and the copy's
registry would load the original's models. On first use of a project's own sqlite store (``mlflow.db`` inside the
project), :func:`relocate_store` finds the folder the store was made in and re-points those locations under the
project; one note says so. A store elsewhere (a shared sqlite file, a server) is never touched: that is how runs are
shared (README "Sharing a run").
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

# MLflow's columns that hold an absolute artifact location (tables absent in a version are skipped)
COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
           ("model_versions", "storage_location"), ("logged_models", "artifact_location"),
           ("workspaces", "default_artifact_root"))


def _path(location: str) -> str:
    return unquote(urlparse(location).path) if location.startswith("file:") else location


def made_in(con: sqlite3.Connection, artifact_root: str) -> str | None:
    """The project folder the store was made in: the part of the artifact location of the experiments lorax made
    (``<project>/<artifact_root>/<experiment name>``) before that tail; None unless they all agree on one."""
    found = set()
    for name, location in con.execute("SELECT name, artifact_location FROM experiments"):
        path = _path(location or "").rstrip("/")
        tail = f"/{artifact_root.strip('/')}/{name}"
        if path.endswith(tail) and os.path.isabs(path):
            found.add(path[: -len(tail)] or "/")
    return found.pop() if len(found) == 1 else None


def relocate_store(db: str | Path, project: str | Path, artifact_root: str) -> str | None:
    """Re-point the artifact locations of the project's sqlite store ``db`` from the folder it was made in to
    ``project``; returns that old folder (None when nothing was moved: same folder, not a copy, or not the
    project's own store)."""
    db, project = Path(db).resolve(), Path(project).resolve()
    if not db.is_file() or not db.is_relative_to(project) or db.stat().st_size == 0:
        return None
    con = sqlite3.connect(db, timeout=30)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return None
        old = made_in(con, artifact_root)
        if old is None or Path(old) == project:
            return None
        with con:  # one transaction
            for table, col in COLUMNS:
                if table not in tables:
                    continue
                for before, after in ((Path(old).as_uri() + "/", project.as_uri() + "/"), (old + "/", f"{project}/")):
                    con.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) WHERE substr({col}, 1, ?) = ?",
                                (after, len(before) + 1, len(before), before))
    finally:
        con.close()
    log.warning("tracking store %s was made in %s: its artifact locations now point under %s (a copied project "
                "writes and reads its own mlartifacts/, never the original's)", db, old, project)
    return old
