"""``lorax serve`` for real: a sqlite MLflow registry, two versions of a tiny attributor, HTTP on loopback; the
alias moves while a client keeps sending requests."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lorax.continual.state import state_hash
from pipelines.serving.server import ChampionFollower, registry_follower, request_frame, serve
from pipelines.tracking import model_registry as registry
from pipelines.tracking.tracker import Tracker


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_running_server_follows_the_champion_without_failing_a_request(stream, tmp_path: Path) -> None:
    params = stream.params.model_copy(deep=True)
    params.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(params, tmp_path)
    name = params.tracking.registered_model
    parent = tracker.start_stream(params.tasks)

    def register(k: int) -> dict:
        task = params.tasks[k]
        state = stream.out / "state" / task
        ev = json.loads((stream.out / "eval" / f"{task}.json").read_text())
        return registry.register(tracker, task=task, tasks=params.tasks[: k + 1], state_dir=state,
                                 memory_path=stream.out / "memory" / f"{task}.parquet", eval_result=ev,
                                 run_id=tracker.start_task(parent, task, k), state_id=state_hash(state))

    assert register(0)["aliases"] == ["champion"]
    follower = registry_follower(tracker, poll_s=0.5)
    httpd = serve(follower, name, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    image = base64.b64encode(stream.val_images(params.tasks[0])[0].read_bytes()).decode()
    answers: list[tuple[int, float, dict]] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.time() + 120  # bounded: the test stops it long before
        while not stop.is_set() and time.time() < deadline:
            code, body = _post(f"{url}/invocations", {"dataframe_records": [{"image": image}]})
            answers.append((code, time.time(), body))

    try:
        assert urllib.request.urlopen(f"{url}/ping", timeout=10).status == 200
        worker = threading.Thread(target=client)
        worker.start()
        started = time.time()
        while len(answers) < 3 and time.time() < started + 120:  # bounded: a dead server fails below, not hangs
            time.sleep(0.1)
        assert len(answers) >= 3
        moved = time.time()
        v2 = register(1)  # passes the gate: the alias moves under the running server
        assert v2["aliases"] == ["champion"] and v2["version"] == 2
        while time.time() < moved + 60 and not any(b.get("predictions", [{}])[0].get("model_version") == "2"
                                                   for _, _, b in answers):
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        worker.join(timeout=90)
        assert not worker.is_alive()
        assert json.loads(urllib.request.urlopen(f"{url}/version", timeout=30).read())["model_version"] == "2"
        code, body = _post(f"{url}/invocations", {"dataframe_records": [{"img": image}]})
        assert code == 400 and "'image'" in body["message"] and "img" in body["message"]
        assert "\n" not in body["message"]  # one line, no trace
        code, body = _post(f"{url}/invocations", {"records": []})
        assert code == 400 and "dataframe_records" in body["message"]
    finally:
        stop.set()
        httpd.shutdown()
        follower.stop()
    assert all(code == 200 for code, _, _ in answers), [b for c, _, b in answers if c != 200][:2]
    versions = [int(b["predictions"][0]["model_version"]) for _, _, b in answers]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions)  # swapped once, never back
    row = answers[-1][2]["predictions"][0]
    assert row["status"] == "ok" and row["verdict"] in ("real", "fake")


def test_a_version_that_fails_to_load_leaves_the_old_one_serving() -> None:
    names = iter([1, 2, 2])

    def load(v: int):
        if v == 2:
            raise OSError("artifact missing")
        return object()

    f = ChampionFollower(lambda: next(names), load, poll_s=60)
    assert f.refresh() and f.current.version == 1
    assert not f.refresh() and f.current.version == 1  # 2 failed to load: still 1, retried at the next poll
    assert not f.refresh() and f.current.version == 1


def test_request_forms_and_refusals() -> None:
    frame, params = request_frame({"dataframe_records": [{"image": "x"}], "params": {"batch_size": 4}})
    assert list(frame.columns) == ["image"] and params == {"batch_size": 4}
    frame, _ = request_frame({"dataframe_split": {"columns": ["image"], "data": [["x"], ["y"]]}})
    assert len(frame) == 2
    with pytest.raises(ValueError, match="exactly one of"):
        request_frame({"records": []})
    with pytest.raises(ValueError, match="exactly one of"):
        request_frame({"dataframe_records": [], "inputs": []})
