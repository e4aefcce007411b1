"""Where runs go, and a tracking server that is down: a fast, clear error and no silent local fallback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lorax.config import TrackingConfig
from pipelines.tracking.uri import TrackingUnavailable, check_reachable, resolve_tracking_uri
from tests.helpers import tool_env, write_project


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uri_precedence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://tracking.example:5000"
    assert resolve_tracking_uri(TrackingConfig(uri="sqlite:///runs/m.db"), tmp_path) == \
        f"sqlite:///{(tmp_path / 'runs' / 'm.db').resolve()}"


def test_server_down_is_a_clear_error(tmp_path: Path) -> None:
    port = closed_port()
    with pytest.raises(TrackingUnavailable) as e:
        check_reachable(TrackingConfig(uri=f"http://127.0.0.1:{port}"), tmp_path)  # refused at once
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "not reachable" in msg and "tracking.uri in params.yaml" in msg
    assert "falls back" in msg
    assert not (tmp_path / "mlflow.db").exists()


def test_plain_file_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrackingUnavailable, match="plain file store"):
        check_reachable(TrackingConfig(uri=str(tmp_path / "mlruns")), tmp_path)


def test_stage_fails_fast_when_the_server_is_down(tmp_path: Path) -> None:
    """The init stage (a real process, as DVC runs it) exits 2 with the message and leaves nothing behind."""
    root = write_project(tmp_path / "p", ["deconv"])
    port = closed_port()
    res = subprocess.run([sys.executable, "-m", "pipelines.init"], cwd=root, capture_output=True, text=True,
                         env=tool_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"), timeout=300)
    assert res.returncode == 2, res.stderr
    assert "stage init: error: MLflow tracking server" in res.stderr
    assert "MLFLOW_TRACKING_URI environment variable" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (root / "state").exists() and not (root / "mlflow.db").exists()
