"""``lorax serve``: the registered champion behind MLflow's scoring protocol, following the alias as it moves.

``mlflow models serve -m models:/lorax-attributor@champion`` resolves the alias once, so a server started before a
new champion keeps answering with the old one. This server speaks the same protocol (POST ``/invocations`` with
``dataframe_records``, ``dataframe_split``, ``inputs`` or ``instances``; answer ``{"predictions": [...]}``; GET
``/ping``, ``/health``, ``/version``) and watches the alias: every ``poll_s`` seconds it asks the registry which
version the alias names, loads a new one in the background (MLflow pyfunc, the same model ``mlflow models serve``
loads) and swaps it in atomically. A request runs on the model it started with, so none fails during a swap; every
row says which version answered (``model_version``). A version that fails to load is logged and the old one keeps
serving. Loopback by default: whoever can reach the port can score images (file paths stay refused unless the
operator allows a folder, :mod:`lorax.serving.rows`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024 * 1024  # bytes of one request: a batch of base64 images, not a file upload service
INPUT_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")


@dataclass(frozen=True)
class Served:
    """One loaded version: the pyfunc model and a lock (a model scores one batch at a time)."""

    version: int
    model: Any
    lock: threading.Lock


class ChampionFollower:
    """The version behind ``alias`` of ``name``, reloaded when the alias moves.

    ``resolve()`` -> the version the alias names now (None: no such alias yet); ``load(version)`` -> a model with
    ``predict(frame, params=...)``. Both are injected so the logic is the same for any registry."""

    def __init__(self, resolve: Callable[[], int | None], load: Callable[[int], Any], poll_s: float = 5.0) -> None:
        self._resolve, self._load, self.poll_s = resolve, load, poll_s
        self._current: Served | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps: list[tuple[int, float]] = []  # (version, time it started serving)

    @property
    def current(self) -> Served | None:
        return self._current

    def refresh(self) -> bool:
        """Load and swap in the alias's version if it changed; True when a swap happened."""
        try:
            version = self._resolve()
        except Exception as e:  # noqa: BLE001 - a registry hiccup must not stop serving the current version
            log.warning("serve: cannot read the alias (%s); still serving %s", e,
                        self._current.version if self._current else "nothing")
            return False
        if version is None or (self._current is not None and self._current.version == version):
            return False
        t0 = time.perf_counter()
        try:
            model = self._load(version)
        except Exception:  # noqa: BLE001
            log.exception("serve: version %s failed to load; still serving %s", version,
                          self._current.version if self._current else "nothing")
            return False
        before = self._current.version if self._current else None
        self._current = Served(version, model, threading.Lock())  # one reference assignment: atomic
        self.swaps.append((version, time.time()))
        log.info("serve: now serving version %s (was %s; loaded in %.1f s)", version, before,
                 time.perf_counter() - t0)
        return True

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._watch, name="lorax-serve-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.refresh()

    def predict(self, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> tuple[int, pd.DataFrame]:
        served = self._current
        if served is None:
            raise NoModel()
        with served.lock:
            out = served.model.predict(frame, params=params) if params else served.model.predict(frame)
        return served.version, out


class NoModel(RuntimeError):
    """No version behind the alias yet."""


def request_frame(body: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """The model input and params of a scoring request, in MLflow's JSON forms."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object with one of " + ", ".join(INPUT_KEYS))
    keys = [k for k in INPUT_KEYS if k in body]
    if len(keys) != 1:
        raise ValueError(f"the request needs exactly one of {', '.join(INPUT_KEYS)} (got {sorted(body)}), e.g. "
                         '{"dataframe_records": [{"image": "<base64 of the image bytes>"}]}')
    key, data = keys[0], body[keys[0]]
    params = body.get("params")
    if key == "dataframe_records":
        if not isinstance(data, list):
            raise ValueError("dataframe_records must be a list of objects")
        return pd.DataFrame.from_records(data) if data else pd.DataFrame({"image": []}), params
    if key == "dataframe_split":
        if not isinstance(data, dict) or "data" not in data:
            raise ValueError("dataframe_split must be an object with 'columns' and 'data'")
        return pd.DataFrame(data["data"], columns=data.get("columns"), index=data.get("index")), params
    return data, params


def _plain(v: Any) -> Any:
    """JSON-safe values (numpy scalars, NaN -> null)."""
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    return v


def predictions_json(version: int, out: Any) -> list[dict[str, Any]]:
    frame = out if isinstance(out, pd.DataFrame) else pd.DataFrame(out)
    rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    # the schema's model_version is text (lorax predict, the pyfunc): the version that answered, whatever the row said
    return [{**{k: _plain(v) for k, v in r.items()}, "model_version": str(version)} for r in rows]


def make_handler(follower: ChampionFollower, name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lorax-serve"

        def log_message(self, fmt: str, *args: Any) -> None:  # the server log, not stderr noise per request
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            cur = follower.current
            if self.path in ("/ping", "/health"):
                self._send(200 if cur else 503, {"status": "ok" if cur else "no champion yet"})
            elif self.path == "/version":
                self._send(200, {"model": name, "model_version": str(cur.version) if cur else None})
            else:
                self._send(404, {"message": "POST /invocations; GET /ping, /health, /version"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/invocations":
                self._send(404, {"message": "POST /invocations"})
                return
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if not 0 < n <= MAX_BODY:
                self._send(400, {"error_code": "BAD_REQUEST", "message": f"a JSON body of 1 to {MAX_BODY} bytes "
                                 "with Content-Length is required"})
                return
            try:
                data, params = request_frame(json.loads(self.rfile.read(n)))
            except (ValueError, TypeError) as e:
                self._send(400, {"error_code": "BAD_REQUEST", "message": str(e).splitlines()[0]})
                return
            try:
                version, out = follower.predict(data, params)
            except NoModel:
                self._send(503, {"error_code": "UNAVAILABLE", "message": f"no version of {name} behind the alias "
                                 "yet; register one (dvc repro, or `lorax models promote`)"})
                return
            except Exception as e:  # noqa: BLE001 - MLflow's exceptions carry the model's one-line refusals
                code = getattr(e, "error_code", None)
                if code == "INVALID_PARAMETER_VALUE":
                    self._send(400, {"error_code": code, "message": getattr(e, "message", str(e))})
                else:
                    log.exception("serve: scoring failed")
                    self._send(500, {"error_code": "INTERNAL_ERROR", "message": "the server failed to score this "
                                     "request (logged on the server)"})
                return
            self._send(200, {"predictions": predictions_json(version, out)})

    return Handler


def registry_follower(tracker, alias: str = "champion", poll_s: float = 5.0) -> ChampionFollower:
    """A follower of ``tracking.registered_model@alias`` in the tracker's registry (MLflow pyfunc models)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    name = tracker.params.tracking.registered_model

    def resolve() -> int | None:
        try:
            return int(tracker.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower():
                return None
            raise

    def load(version: int):
        return mlflow.pyfunc.load_model(f"models:/{name}/{version}", model_config={"model_version": version})

    return ChampionFollower(resolve, load, poll_s)


def serve(follower: ChampionFollower, name: str, host: str = "127.0.0.1", port: int = 5001) -> ThreadingHTTPServer:
    """Start following and bind the HTTP server (``serve_forever`` is the caller's: a thread in tests, the main
    thread in ``lorax serve``)."""
    follower.start()
    httpd = ThreadingHTTPServer((host, port), make_handler(follower, name))
    httpd.daemon_threads = True
    return httpd
