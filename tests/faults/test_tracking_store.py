"""Every tracking-store failure is one line and exit status 2, before any work, and nothing is written."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import lifetime
from pipelines._stage import run_stage
from pipelines.tracking.errors import store_failure
from tests.pipelines.conftest import tool_env, write_project

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def error_lines(stderr: str) -> list[str]:
    """What the user reads besides log records."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]


def init(project: Path, capsys, monkeypatch) -> tuple[int, list[str]]:
    """The init stage of ``python -m pipelines.init --root PROJECT``, run in this process (pytest keeps its signals)."""
    monkeypatch.setattr(sys, "argv", ["pipelines/init.py", "--root", str(project)])
    monkeypatch.setattr(lifetime, "stop_on_signals", lambda: None)
    code = run_stage("init", "pipelines.steps:init_step", task=False, tracking=True)
    return code, error_lines(capsys.readouterr().err)


def mlflow_store(path: Path) -> Path:
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_project(tmp_path / "p", ["deconv"])


def foreign_db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE invoices (id INTEGER)")
    con.commit()
    con.close()


@pytest.mark.parametrize("store, expected", [
    (lambda p: (p / "mlflow.db").mkdir(), "is not a file"),
    (lambda p: (p / "mlflow.db").write_text("not a database " * 200), "is not a sqlite database"),
    (lambda p: foreign_db(p / "mlflow.db"), "not an MLflow store (tables: invoices)"),
], ids=["a-folder", "not-sqlite", "not-mlflow"])
def test_a_store_that_cannot_be_used_is_one_line_and_status_2(project: Path, capsys, monkeypatch, store,
                                                               expected) -> None:
    store(project)
    code, lines = init(project, capsys, monkeypatch)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("stage init: error: tracking store sqlite:///") and expected in lines[0]
    assert not (project / "state").exists() and not (project / "memory").exists()


def test_a_read_only_store_is_one_line_and_status_2_in_a_stage_process(project: Path, tmp_path: Path) -> None:
    """A real stage process (``python -m pipelines.init``) on a store opened read-only (as a read-only mount or a
    file without write permission would be): MLflow would retry for minutes, then print 200 lines."""
    (tmp_path / "shared").mkdir()
    db = mlflow_store(tmp_path / "shared" / "mlflow.db")
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("uri: null", f"uri: sqlite:///{db}?mode=ro"))
    res = subprocess.run([sys.executable, "-m", "pipelines.init"], cwd=project, env=tool_env(LORAX_WARM="0"),
                         capture_output=True, text=True, timeout=300)
    lines = error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "cannot be written (attempt to write a readonly database)" in lines[0] and "Traceback" not in res.stderr
    assert not (project / "state").exists()


def test_an_unreachable_server_is_one_line_and_status_2(project: Path, capsys, monkeypatch) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("uri: null", f"uri: http://127.0.0.1:{port}"))
    code, lines = init(project, capsys, monkeypatch)
    assert code == 2 and len(lines) == 1 and "is not reachable" in lines[0], lines


def test_lorax_commands_report_a_broken_store_in_one_line(project: Path) -> None:
    (project / "mlflow.db").write_text("not a database " * 200)
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "models", "list"], cwd=project,
                         env=tool_env(), capture_output=True, text=True, timeout=300)
    lines = error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1 and "is not a sqlite database" in lines[0], res.stderr


def test_a_full_disk_met_later_is_one_line(tmp_path: Path) -> None:
    """Failures met after the start (the store's disk fills up): the real errors of sqlite and of the file system."""
    con = sqlite3.connect(tmp_path / "full.db")
    con.execute("PRAGMA max_page_count = 2")  # a database that cannot grow: sqlite's own "disk is full"
    with pytest.raises(sqlite3.OperationalError) as e:
        con.execute("CREATE TABLE t (x TEXT)")
        for _ in range(100):
            con.execute("INSERT INTO t VALUES (?)", ("x" * 4000,))
        con.commit()
    line = store_failure(e.value)
    assert line is not None and "\n" not in line and "database or disk is full" in line
    with pytest.raises(OSError) as err:  # the device that is always full
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"an artifact")
    line = store_failure(err.value)
    assert line is not None and "\n" not in line and "no space left on the device" in line
    assert store_failure(KeyError("a bug")) is None  # anything else keeps its traceback


def test_only_the_projects_own_copied_store_is_re_pointed(tmp_path: Path) -> None:
    """A store made in another folder is re-pointed when it is this project's own file (a copied project), never
    when it lives elsewhere (a store shared by several projects)."""
    import shutil

    from mlflow import MlflowClient

    from pipelines.tracking.relocate import relocate_store

    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    copy.mkdir()
    db = original / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.create_experiment("lorax-zoo-5", artifact_location=(original / "mlartifacts" / "lorax-zoo-5").as_uri())
    assert relocate_store(db, copy, "mlartifacts") is None  # not the copy's file: untouched
    assert relocate_store(db, original, "mlartifacts") is None  # made here: nothing to do
    shutil.copy(db, copy / "mlflow.db")
    assert relocate_store(copy / "mlflow.db", copy, "mlartifacts") == str(original)
    moved = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").get_experiment_by_name("lorax-zoo-5")
    assert moved.artifact_location == (copy / "mlartifacts" / "lorax-zoo-5").as_uri()
    assert client.get_experiment_by_name("lorax-zoo-5").artifact_location.startswith(original.as_uri())


def test_a_run_missing_from_the_store_names_the_lost_store(tmp_path: Path) -> None:
    """A stage reading a run an earlier stage recorded, from a store that no longer holds it (mlflow.db deleted while
    DVC kept the outputs): the line says the store was replaced, not that the disk is full."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(Exception) as e:
        client.get_run("893d1401da684694995750ced57f51a9")
    line = store_failure(e.value)
    assert line is not None and "\n" not in line and "lacks a run an earlier stage recorded" in line
    assert "make clean" in line and "free space" not in line
