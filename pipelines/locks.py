"""File locks that die with their process: two flows (or a flow and a person) never grow the champion at once."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


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
