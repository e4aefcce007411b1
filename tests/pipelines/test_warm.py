"""The warm stage server (pipelines/warm.py): stages fork from it with their own arguments, folder, environment and
output; exit codes come back; a killed client takes its stage with it; edited code gets a new server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import warm
from tests.helpers import REPO, tool_env, write_project

pytestmark = pytest.mark.slow


def wait_for(cond, timeout: float = 120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def make_project(root: Path) -> Path:
    """A tiny project carrying its own code (as the DVC projects do), so the server's key is its own."""
    import shutil

    write_project(root, ["deconv"])
    for pkg in ("lorax", "pipelines"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "detection"))
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("warm") / "p")


def stage(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=root, env=tool_env(**env), capture_output=True,
                          text=True, timeout=600)


def socket_of(root: Path) -> Path:
    return warm.runtime_dir() / f"{warm.source_key(root.resolve())}.sock"


def test_a_stage_starts_the_server_and_the_next_ones_fork_from_it(tmp_path: Path) -> None:
    project = make_project(tmp_path / "fresh")  # its own code, so no server of another test serves it
    times = tmp_path / "times.jsonl"
    first = stage(project, "pipelines.synth", "deconv", LORAX_STAGE_TIMES=str(times))
    assert first.returncode == 0, first.stderr
    assert wait_for(socket_of(project).exists), "no warm server started"
    second = stage(project, "pipelines.synth", "deconv", LORAX_STAGE_TIMES=str(times))
    assert second.returncode == 0, second.stderr
    helped = stage(project, "pipelines.synth", "--help")  # the child writes to the client's own stdout
    assert helped.returncode == 0 and "python -m pipelines.synth" in helped.stdout
    runs = [json.loads(line) for line in times.read_text().splitlines()]
    assert [r["warm"] for r in runs] == [False, True]  # the first ran itself, the second in a forked child
    assert (project / "data" / "synth" / "deconv.json").is_file()


def serving(project: Path) -> None:
    """The project's warm server is up: a stage started it (here, when no earlier test did)."""
    if not socket_of(project).exists():
        assert stage(project, "pipelines.synth", "deconv").returncode == 0
    assert wait_for(socket_of(project).exists), "no warm server started"


def test_exit_codes_and_errors_come_back(project: Path) -> None:
    serving(project)
    res = stage(project, "pipelines.synth", "no-such-task")
    assert res.returncode == 2 and "no-such-task" in res.stderr  # the stage's one-line error, on the client's stderr
    off = stage(project, "pipelines.synth", "no-such-task", LORAX_WARM="0")
    assert off.returncode == 2 and off.stderr.splitlines()[-1] == res.stderr.splitlines()[-1]


def test_a_killed_client_takes_its_stage_with_it(project: Path, tmp_path: Path) -> None:
    serving(project)
    pidfile = tmp_path / "pid"
    code = (f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    client = subprocess.Popen([sys.executable, "-c", "import sys; from pipelines.warm import run_warm; "
                               f"sys.exit(run_warm('timeit', ['-n', '1', {code!r}]))"],
                              cwd=project, env=tool_env(), start_new_session=True)
    try:
        assert wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip() != ""), "the stage never ran"
        child = int(pidfile.read_text())
        assert child != client.pid  # it runs in the server's child, not in the client
        os.killpg(client.pid, signal.SIGKILL)
        client.wait()

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"

        assert wait_for(gone, 10), "the stage outlived its killed client"
    finally:
        if client.poll() is None:
            client.kill()


def test_edited_code_gets_a_new_server(project: Path) -> None:
    before = warm.source_key(project.resolve())
    f = project / "lorax" / "utils" / "io.py"
    text, st = f.read_text(), f.stat()
    f.write_text(text + "\n# edited\n")
    try:
        assert warm.source_key(project.resolve()) != before
    finally:  # the module's other tests keep the project's own server
        f.write_text(text)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert warm.source_key(project.resolve()) == before


def test_the_runtime_folder_is_private() -> None:
    d = warm.runtime_dir()
    assert d.stat().st_uid == os.getuid() and d.stat().st_mode & 0o077 == 0
