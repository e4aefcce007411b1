"""Where runs go: resolve the MLflow tracking URI and fail fast when it cannot be reached.

Order: ``tracking.uri`` in params, else ``MLFLOW_TRACKING_URI``, else a sqlite store in the project
(``sqlite:///<root>/mlflow.db``, artifacts under ``<root>/<tracking.artifact_root>``), so the registry works with
no server. A server URI that does not answer is an error at start: a silent fallback to a local store would
scatter a stream's runs over two places.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from lorax.config import TrackingConfig

DEFAULT_DB = "mlflow.db"
REACH_TIMEOUT_S = 3.0


class TrackingUnavailable(RuntimeError):
    """The tracking store named by the settings cannot be used; the message says how to fix it."""


def _source(cfg: TrackingConfig) -> tuple[str | None, str]:
    if cfg.uri:
        return cfg.uri, "tracking.uri in params.yaml"
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


def check_reachable(cfg: TrackingConfig, root: str | Path = ".", timeout: float = REACH_TIMEOUT_S) -> str:
    """Resolve the URI and check it can be used within ``timeout`` seconds; returns the URI.

    http(s): the server must answer (any HTTP status counts as an answer; refused, unresolvable or silent
    is :class:`TrackingUnavailable`). sqlite: its folder must exist or be creatable. Plain file stores are
    refused by MLflow 3, so they are refused here with the fix.
    """
    uri = resolve_tracking_uri(cfg, root)
    _, where = _source(cfg)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answered; authentication or routing problems surface with MLflow's own message
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} (from {where}) is not reachable within {timeout:.0f}s: {reason}. "
                f"Start it (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --port {parsed.port or 5000}`), "
                f"fix the URI, or unset it (tracking.uri: null and no MLFLOW_TRACKING_URI) to use the project's "
                f"sqlite store. Nothing was logged and nothing falls back to a local store."
            ) from None
        return uri
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrackingUnavailable(f"tracking store {uri} (from {where}): cannot create its folder: {e}") from None
        return uri
    if parsed.scheme in ("", "file"):
        raise TrackingUnavailable(
            f"tracking URI {uri!r} (from {where}) is a plain file store, which MLflow 3 refuses; use "
            f"sqlite:///path/to/mlflow.db or an http(s) server"
        )
    return uri  # other backends (postgresql://, databricks, ...): MLflow checks them itself
