"""Writing files so that a crash never leaves half of one: the one atomic-write helper and JSON reader/writer.

Every output a step or a cache checks to decide "already done" (states, manifests, memories, evaluations, caches)
is written through :func:`atomic_path`: the bytes go to a temporary sibling first and are renamed over the target
(atomic on POSIX), so an interrupted run leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The temporary name carries the process id, so two processes writing the same target never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """``text`` to ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON (non-JSON values as their ``str``), atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path, missing: str | None = None) -> Any:
    """The JSON in ``path``; a missing file is a FileNotFoundError that says what to run (``missing``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {missing or 'run the step that writes it first'}")
    return json.loads(path.read_text())
