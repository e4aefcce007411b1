"""The warm stage server removes its socket when it exits, and serves code by content (not size and mtime)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import warm
from tests.pipelines.conftest import REPO, tool_env, write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project with its own copy of the code, so its server key is its own."""
    root = write_project(tmp_path_factory.mktemp("warmfaults") / "p", ["deconv"])
    for pkg in ("lorax", "pipelines"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "detection"))
    return root


def test_an_edit_that_keeps_size_and_mtime_gets_a_new_key(project: Path) -> None:
    f = project / "lorax" / "utils" / "io.py"
    text, st = f.read_text(), f.stat()
    before = warm.source_key(project.resolve())
    i = text.index("atomically")
    f.write_text(text[:i] + "ATOMICALLY" + text[i + len("atomically"):])  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    try:
        assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
        assert warm.source_key(project.resolve()) != before
    finally:
        f.write_text(text)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert warm.source_key(project.resolve()) == before


def start(project: Path, sock: Path, idle_s: float) -> subprocess.Popen:
    """The server of ``python -m pipelines.warm SOCK``, idle for ``idle_s`` at most, preloading nothing (its exit
    is what is tested, not its imports)."""
    code = (f"import sys; from pathlib import Path; from pipelines import warm; warm.IDLE_S = {idle_s!r}; "
            f"warm.PRELOAD = (); sys.exit(warm.serve(Path({str(sock)!r})))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=project, env=tool_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not sock.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert sock.exists(), "the server never bound its socket"
    return proc


@pytest.mark.parametrize("how", ["idle", "SIGTERM"])
def test_the_server_removes_its_socket_when_it_exits(project: Path, how: str) -> None:
    sock = warm.runtime_dir() / f"faults-test-{os.getpid()}-{how}.sock"
    sock.unlink(missing_ok=True)
    proc = start(project, sock, idle_s=1.0 if how == "idle" else 600.0)
    try:
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not sock.exists(), f"{how}: the socket {sock} was left behind"
    assert not sock.with_suffix(".starting").exists()
