"""Where runs go: resolve the MLflow tracking URI and fail fast when it cannot be reached.

Order: ``tracking.uri`` in params, else ``MLFLOW_TRACKING_URI``, else a sqlite store in the project
(``sqlite:///<root>/mlflow.db``, artifacts under ``<root>/<tracking.artifact_root>``), so the registry works with
no server. A server URI that does not answer, or answers but not as MLflow (a wrong port with another web service),
is an error at start, in one line: a silent fallback to a local store would scatter a stream's runs over two
places, and a late failure would come as MLflow's traceback after the stage had started its work.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from lorax.config import TrackingConfig

DEFAULT_DB = "mlflow.db"
REACH_TIMEOUT_S = 3.0
# Any MLflow tracking server answers this with JSON (the first experiment, or MLflow's error object); /health
# answers "OK" on too many other services to tell them apart.
PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


class TrackingUnavailable(RuntimeError):
    """The tracking store named by the settings cannot be used; the message says how to fix it."""


def _source(cfg: TrackingConfig) -> tuple[str | None, str]:
    if cfg.uri:
        return cfg.uri, cfg.uri_origin or "tracking.uri in params.yaml"
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env, "the MLFLOW_TRACKING_URI environment variable"
    return None, "the default"


def resolve_tracking_uri(cfg: TrackingConfig, root: str | Path = ".") -> str:
    """The tracking URI to use; relative sqlite paths are made absolute against ``root``."""
    uri, _ = _source(cfg)
    if uri is None:
        return f"sqlite:///{(Path(root) / DEFAULT_DB).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel and rel != ":memory:":
            return f"sqlite:///{(Path(root) / rel).resolve()}"
    return uri


def artifact_location(cfg: TrackingConfig, root: str | Path, experiment: str, uri: str) -> str | None:
    """Artifact folder for a new experiment in a local store; None for a server (it decides)."""
    if urlparse(uri).scheme in ("http", "https", "databricks"):
        return None
    return (Path(root) / cfg.artifact_root / experiment).resolve().as_uri()


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's own client would send (basic auth or a bearer token), when set."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _tls() -> ssl.SSLContext | None:
    """The TLS settings MLflow's client honours (its CA bundle, client certificate, or no verification)."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # the user asked MLflow for exactly this
    ca, client = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"), os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
    if not (ca or client):
        return None
    ctx = ssl.create_default_context(cafile=ca or None)
    if client:
        ctx.load_cert_chain(client)
    return ctx


def _probe(uri: str, timeout: float) -> tuple[int, bytes, str]:
    """(HTTP status, up to 64 KiB of the body, content type) of MLflow's cheapest JSON answer: the first experiment."""
    req = urllib.request.Request(uri.rstrip("/") + PROBE, headers={"Accept": "application/json", **_auth_headers()})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_tls() if uri.startswith("https") else None) as r:
            return r.status, r.read(65536), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        try:
            body = e.read(65536)
        except OSError:
            body = b""
        return e.code, body, e.headers.get("Content-Type", "") if e.headers else ""


def _mlflow_like(status: int, body: bytes) -> str | None:
    """None when the answer is MLflow's; else what it was instead (for the message)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return f"returned {status}, not JSON"
    if not isinstance(doc, dict):
        return f"returned {status} with JSON that is not an MLflow answer"
    if status == 200 or "error_code" in doc:  # a search result ({} when empty) or MLflow's error object
        return None
    return f"returned {status} without MLflow's error_code"


def _check_server(uri: str, where: str, timeout: float) -> None:
    """Raise :class:`TrackingUnavailable` unless ``uri`` answers MLflow's REST API (one line, before any work).

    401/403 cannot be told apart from a proxy in front of MLflow, so they are judged by the credentials: with none
    set it is "asks for credentials" (every later call would fail the same way); with credentials that are refused,
    "refused the credentials". When ``MLFLOW_TRACKING_AUTH`` names an auth plugin (it sends its own headers, which
    this probe cannot), a 401/403 is let through and MLflow reports it.
    """
    parsed = urlparse(uri)
    fix = (f"check the host/port (an MLflow server is started with `mlflow server --backend-store-uri "
           f"sqlite:///mlflow.db --port {parsed.port or 5000}`), fix the URI, or unset it (tracking.uri: null and no "
           f"MLFLOW_TRACKING_URI) to use the project's sqlite store. Nothing was logged")
    try:
        status, body, _ = _probe(uri, timeout)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} (from {where}) is not reachable within {timeout:.0f}s: {reason}. "
            f"Start it (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --port {parsed.port or 5000}`), "
            f"fix the URI, or unset it (tracking.uri: null and no MLFLOW_TRACKING_URI) to use the project's "
            f"sqlite store. Nothing was logged and nothing falls back to a local store."
        ) from None
    if status in (401, 403):
        if os.environ.get("MLFLOW_TRACKING_AUTH"):
            return
        if not _auth_headers():
            raise TrackingUnavailable(
                f"tracking server {uri} (from {where}) asks for credentials (GET {PROBE} returned {status}); set "
                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or {fix}."
            )
        raise TrackingUnavailable(
            f"tracking server {uri} (from {where}) refused the credentials in MLFLOW_TRACKING_USERNAME/PASSWORD or "
            f"MLFLOW_TRACKING_TOKEN (GET {PROBE} returned {status}); check them and the user's permissions."
        )
    other = _mlflow_like(status, body)
    if other is not None:
        raise TrackingUnavailable(
            f"{uri} (from {where}) answers but is not an MLflow tracking server (GET {PROBE} {other}); {fix}."
        )


def check_reachable(cfg: TrackingConfig, root: str | Path = ".") -> str:
    """Resolve the URI and check it can be used within :data:`REACH_TIMEOUT_S` seconds; returns the URI.

    http(s): the server must answer MLflow's REST API (:func:`_check_server`: refused, unresolvable or silent is
    "not reachable"; an answer that is not MLflow's JSON, e.g. another web service on that port, is "not an MLflow
    tracking server"), always :class:`TrackingUnavailable` with one line. sqlite: its folder must exist or be
    creatable, and the file must be a writable MLflow (or empty) sqlite database
    (:func:`pipelines.tracking.errors.probe_sqlite`); the project's own store, copied from another folder, is
    re-pointed at its own artifacts (:func:`pipelines.tracking.relocate.relocate_store`). Plain file stores are refused by MLflow 3, so they are refused
    here with the fix.
    """
    uri = resolve_tracking_uri(cfg, root)
    _, where = _source(cfg)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_server(uri, where, REACH_TIMEOUT_S)
        return uri
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):].partition("?")[0]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrackingUnavailable(f"tracking store {uri} (from {where}): cannot create its folder: {e}") from None
            from pipelines.tracking.errors import probe_sqlite

            problem = probe_sqlite(path, uri, where)
            if problem is not None:
                raise TrackingUnavailable(problem)
            from pipelines.tracking.relocate import relocate_store

            relocate_store(path, root, cfg.artifact_root)  # a copied project's own store: its own artifacts
        return uri
    if parsed.scheme in ("", "file"):
        raise TrackingUnavailable(
            f"tracking URI {uri!r} (from {where}) is a plain file store, which MLflow 3 refuses; use "
            f"sqlite:///path/to/mlflow.db or an http(s) server"
        )
    return uri  # other backends (postgresql://, databricks, ...): MLflow checks them itself
