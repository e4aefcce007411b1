"""Tracking-store failures as one line: a stage or command that cannot use its MLflow store says which store and
why, in one line, and exits with status 2 (never MLflow's or SQLAlchemy's 200-line traceback).

:func:`probe_sqlite` checks a sqlite store before any work (MLflow itself retries a store it cannot open for about
two minutes, then fails with a traceback); :func:`store_failure` turns a failure met later (disk full, a server
that went away, a store made read-only meanwhile) into the line.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
from pathlib import Path

# errors of the file system under a store (or any output): one line naming the file
FS_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}
FIX = ("free space or make it writable, or point tracking.uri / MLFLOW_TRACKING_URI at a store that is; "
       "nothing already done is lost: re-run to continue")
LOST = ("the store was replaced or deleted while DVC kept the stages' outputs (e.g. mlflow.db removed by hand): point "
        "tracking.uri / MLFLOW_TRACKING_URI at the store the stream was trained with, or start the stream again "
        "(`make clean` also drops dvc.lock and DVC's cache; then `dvc repro`)")
MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}


def probe_sqlite(path: str, uri: str, where: str) -> str | None:
    """Why the sqlite store at ``path`` cannot be used by MLflow (one line), or None when it can.

    Opens it with sqlite itself and makes one write that is rolled back (a read-only file or folder fails there), and
    refuses a database that holds tables but not MLflow's (another program's file)."""
    p = Path(path)
    if p.exists() and not p.is_file():
        return f"tracking store {uri} (from {where}): {path} is not a file; remove it or fix the URI"
    if not p.exists():  # nothing to open yet (a reader must not create it): MLflow makes it in its folder
        if not os.access(p.parent, os.W_OK | os.X_OK):
            return f"tracking store {uri} (from {where}) cannot be created: {p.parent} is not writable; {FIX}"
        return None
    query = uri.partition("?")[2]
    target = f"file:{path}{'?' + query if query else ''}"
    try:
        con = sqlite3.connect(target, uri=True, timeout=10)
    except sqlite3.Error as e:
        return f"tracking store {uri} (from {where}): cannot open it ({e}); {FIX}"
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and not MLFLOW_TABLES <= tables:
            return (f"tracking store {uri} (from {where}) is a sqlite database but not an MLflow store (tables: "
                    f"{', '.join(sorted(tables)[:5])}); point tracking.uri at an MLflow store or a new file")
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE lorax_write_probe (x INTEGER)")
        con.rollback()
    except sqlite3.Error as e:
        what = "is not a sqlite database" if "not a database" in str(e) else f"cannot be written ({e})"
        return f"tracking store {uri} (from {where}) {what}; {FIX}"
    finally:
        con.close()
    return None


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def store_failure(e: BaseException) -> str | None:
    """The one line for a failure of the tracking store (or of the disk under it) anywhere in ``e``'s chain; None
    when ``e`` is something else (then it is a bug, and its traceback is wanted)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in FS_ERRNOS:
            name = f"{x.filename}: " if x.filename else ""
            return f"cannot write {name}{FS_ERRNOS[x.errno]}; {FIX}"
        if isinstance(x, sqlite3.Error):
            return f"the tracking store's sqlite database failed: {_first_line(x)}; {FIX}"
        mlflow_exc = sys.modules.get("mlflow.exceptions")
        if mlflow_exc is not None and isinstance(x, mlflow_exc.MlflowException):
            if getattr(x, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" and "Run " in str(x):
                return f"the MLflow tracking store lacks a run an earlier stage recorded ({_first_line(x)}); {LOST}"
            return f"the MLflow tracking store failed: {_first_line(x)}; {FIX}"
        sa_exc = sys.modules.get("sqlalchemy.exc")
        if sa_exc is not None and isinstance(x, sa_exc.SQLAlchemyError):
            orig = getattr(x, "orig", None)
            return f"the tracking store's database failed: {_first_line(orig or x)}; {FIX}"
        requests_exc = sys.modules.get("requests.exceptions")
        if requests_exc is not None and isinstance(x, requests_exc.RequestException):
            return f"the MLflow tracking server did not answer: {_first_line(x)}; {FIX}"
    return None
