"""A tracking URI that answers but is not MLflow (a wrong port, another web service): one line before any work."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from lorax.config import TrackingConfig, load_params
from pipelines.tracking import uri as tracking_uri
from pipelines.tracking.uri import PROBE, TrackingUnavailable, check_reachable
from tests.helpers import BIN, tool_env, write_project

SERVER_START_S = 120  # bounded wait for a real server to answer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    pytest.fail(f"server did not answer within {SERVER_START_S}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _spawn(args: Callable[[int], list[str]], tmp: Path, ready_path: str) -> Iterator[str]:
    """Run ``args(port)`` in ``tmp`` until the test module ends; yields the server's URL once it answers."""
    port = _free_port()
    log = tmp / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(args(port), stdout=fh, stderr=subprocess.STDOUT, cwd=tmp, env=tool_env(),
                                start_new_session=True)
    try:
        _wait_up(proc, f"http://127.0.0.1:{port}{ready_path}", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port with a sqlite store."""
    tmp = tmp_path_factory.mktemp("mlflow_server")
    yield from _spawn(lambda port: [
        str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--default-artifact-root", str(tmp / "artifacts"), "-h", "127.0.0.1", "-p", str(port), "--workers", "1",
    ], tmp, "/health")


@pytest.fixture(scope="module")
def plain_http_server(tmp_path_factory) -> Iterator[str]:
    """Another web service on the port: a real `python -m http.server` (404 HTML for MLflow's API)."""
    tmp = tmp_path_factory.mktemp("http_server")
    yield from _spawn(lambda port: [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], tmp, "/")


class _Fake(BaseHTTPRequestHandler):
    """Answers every GET with the class's (status, content type, body); records the Authorization header."""

    answer: tuple[int, str, bytes] = (200, "text/plain", b"OK")
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        status, ctype, body = type(self).answer
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[type[_Fake]]:
    handler = type("Handler", (_Fake,), {"seen": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield handler
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(autouse=True)
def patient_probe(monkeypatch) -> None:
    """The servers here all answer, if slowly on a loaded machine: the probe waits up to 10 s for them."""
    monkeypatch.setattr(tracking_uri, "REACH_TIMEOUT_S", 10.0)


def _refused(uri: str, tmp_path: Path) -> str:
    with pytest.raises(TrackingUnavailable) as e:
        check_reachable(TrackingConfig(uri=uri), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and uri in msg and "tracking.uri in params.yaml" in msg
    return msg


CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_AUTH")


def test_a_real_mlflow_server_passes(mlflow_server: str, tmp_path: Path, monkeypatch) -> None:
    for var in CREDENTIALS:
        monkeypatch.delenv(var, raising=False)
    assert check_reachable(TrackingConfig(uri=mlflow_server), tmp_path) == mlflow_server
    assert check_reachable(TrackingConfig(uri=mlflow_server + "/"), tmp_path) == mlflow_server + "/"


def test_another_web_service_is_not_mlflow(plain_http_server: str, tmp_path: Path) -> None:
    msg = _refused(plain_http_server, tmp_path)
    assert "answers but is not an MLflow tracking server" in msg
    assert f"GET {PROBE} returned 404, not JSON" in msg and "check the host/port" in msg


@pytest.mark.parametrize("answer, why", [
    ((200, "text/plain", b"OK"), "returned 200, not JSON"),  # a service whose every path says OK (/health-like)
    ((404, "application/json", b'{"detail": "Not Found"}'), "returned 404 without MLflow's error_code"),
    ((200, "application/json", b"[1, 2]"), "returned 200 with JSON that is not an MLflow answer"),
], ids=["ok-text", "json-404", "json-list"])
def test_answers_that_are_not_mlflow(fake_server, answer, why: str, tmp_path: Path) -> None:
    fake_server.answer = answer
    assert why in _refused(fake_server.url, tmp_path)


def test_mlflow_shaped_answers_pass(fake_server, tmp_path: Path, monkeypatch) -> None:
    """An empty search ({}) and MLflow's error object (e.g. a store problem) are MLflow's own answers."""
    for var in CREDENTIALS:
        monkeypatch.delenv(var, raising=False)
    for answer in ((200, "application/json", b"{}"),
                   (500, "application/json", json.dumps({"error_code": "INTERNAL_ERROR", "message": "x"}).encode())):
        fake_server.answer = answer
        assert check_reachable(TrackingConfig(uri=fake_server.url), tmp_path) == fake_server.url


def test_authentication(fake_server, tmp_path: Path, monkeypatch) -> None:
    """401/403: no credentials set -> "asks for credentials"; credentials sent and refused -> "refused"; accepted
    credentials reach MLflow's JSON and pass."""
    for var in CREDENTIALS:
        monkeypatch.delenv(var, raising=False)
    fake_server.answer = (401, "text/plain", b"You are not authenticated.")
    msg = _refused(fake_server.url, tmp_path)
    assert "asks for credentials" in msg and "returned 401" in msg and "MLFLOW_TRACKING_USERNAME" in msg
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    assert "refused the credentials" in _refused(fake_server.url, tmp_path)
    assert fake_server.seen[-1] == "Basic " + base64.b64encode(b"ann:pw").decode()
    fake_server.answer = (200, "application/json", b'{"experiments": []}')
    assert check_reachable(TrackingConfig(uri=fake_server.url), tmp_path) == fake_server.url


def test_an_s_override_is_named(plain_http_server: str, tmp_path: Path) -> None:
    write_project(tmp_path / "p", ["deconv"])
    params = load_params(tmp_path / "p" / "params.yaml", {"tracking.uri": plain_http_server})
    with pytest.raises(TrackingUnavailable) as e:
        check_reachable(params.tracking, tmp_path)
    assert f"(from -S tracking.uri={plain_http_server})" in str(e.value) and "params.yaml" not in str(e.value)


def test_stage_stops_with_one_line_for_a_non_mlflow_server(plain_http_server: str, tmp_path: Path) -> None:
    """The init stage (a real process, as DVC runs it) exits 2 with one line, no traceback, nothing written."""
    root = write_project(tmp_path / "p", ["deconv"])
    res = subprocess.run([sys.executable, "-m", "pipelines.init"], cwd=root, capture_output=True, text=True,
                         env=tool_env(MLFLOW_TRACKING_URI=plain_http_server), timeout=300, check=False)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("stage init: error: ") and \
        "answers but is not an MLflow tracking server" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "MlflowException" not in res.stderr
    assert not (root / "state").exists() and not (root / "mlflow.db").exists()
