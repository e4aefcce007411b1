"""How long a stage process lives: no longer than whoever started it, one trainer per task, a stop it can record.

``kill -9`` of ``dvc repro`` kills DVC alone: its stage process (and a warm stage's forked child) would train on,
and a re-run would start a second trainer on the same epoch checkpoints. So a stage watches the process that
started it (through the shell DVC runs commands in) and stops when it is gone; a stop (SIGTERM, SIGHUP, or that
watch) is raised as :class:`Stopped` in the main thread, so the step can end its MLflow run as KILLED with the epoch
it reached before the process exits. A task is trained under a lock on its resume point (:func:`task_lock`): a
second trainer waits for the first to end, then stops with one line naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.locks import file_lock

log = logging.getLogger(__name__)

SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "fish", "busybox"}  # what DVC may run a stage's cmd in
STOP_GRACE_S = 15.0  # after its starter is gone, a stage that has not ended by itself is killed
LOCK_WAIT_S = 30.0  # a second trainer waits this long for the first to end (a stopping one needs a few seconds)


class Stopped(BaseException):
    """The process was told to stop (SIGTERM, SIGHUP, or its starter is gone); like KeyboardInterrupt, not an error
    of the step. A BaseException so that ``except Exception`` in a library never swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class TaskBusy(RuntimeError):
    """Another process is training this task (its pid is in the message)."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise :class:`Stopped` in the main thread (Python's default ends the process at once,
    leaving the step's MLflow run RUNNING forever)."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, _raise_stopped)


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of ``pid`` from /proc; None when it is gone (a zombie, killed but not
    yet reaped by its own parent, is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else (int(fields[1]), fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _starter() -> int:
    """The process this one lives for: its parent, or the parent's parent when the parent is a shell running the
    command (``sh -c 'python -m ...'`` of DVC; most shells exec the command and are not there at all)."""
    ppid = os.getppid()
    try:
        comm = Path(f"/proc/{ppid}/comm").read_text().strip()
    except OSError:
        return ppid
    if comm in SHELLS and (st := _stat(ppid)) is not None and st[0] > 1:
        return st[0]
    return ppid


def die_with_starter(grace_s: float = STOP_GRACE_S) -> bool:
    """Stop this process when the process that started it ends (Linux): SIGTERM to itself (the step sees
    :class:`Stopped`, a warm stage's client forwards it to the stage), then SIGKILL after ``grace_s``.

    A daemon thread reads /proc four times a second (identity by pid and start time, so a reused pid is not mistaken
    for the starter). Returns whether it watches (not on other systems, nor when started by init)."""
    if sys.platform != "linux":
        return False
    pid = _starter()
    first = _stat(pid)
    if pid <= 1 or first is None:
        return False

    def watch() -> None:
        while (now := _stat(pid)) is not None and now[1] == first[1]:
            time.sleep(0.25)
        log.warning("the process that started this stage (pid %d) is gone; stopping", pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lorax-starter-watch", daemon=True).start()
    return True


def ends_with_parent() -> None:
    """``preexec_fn`` of a child that must not outlive the command starting it (``lorax demo``'s ``dvc repro``):
    SIGTERM when this process dies, ``kill -9`` included (Linux ``PR_SET_PDEATHSIG``)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def lock_path(locks: Path, state_dir: Path) -> Path:
    """The lock of one task's state folder (outside the project: DVC hashes state/; one per resolved folder, so a
    copied project has its own)."""
    key = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return Path(locks) / f"train-{Path(state_dir).name}-{key}.lock"


def holder(path: Path) -> str:
    """The pid a lock file names (``file_lock`` writes ``PID TIME``), or '?'."""
    try:
        return Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return "?"


@contextlib.contextmanager
def task_lock(locks: Path, state_dir: Path, task: str) -> Iterator[None]:
    """Hold the lock of ``state_dir`` while training ``task``; another holder is waited for up to
    :data:`LOCK_WAIT_S`, then :class:`TaskBusy` names its pid. The lock dies with its process (``flock``), so a
    killed trainer leaves none."""
    path = lock_path(locks, state_dir)
    with file_lock(path) as held:
        if held:
            yield
            return
    log.info("task %s is being trained by process %s; waiting up to %.0fs for it to end", task, holder(path),
             LOCK_WAIT_S)
    with file_lock(path, blocking=True, timeout=LOCK_WAIT_S) as held:
        if not held:
            raise TaskBusy(f"task {task}: {state_dir} is being trained by process {holder(path)} (lock {path}); "
                           f"wait for it to end or stop it (`kill {holder(path)}`), then re-run")
        yield
