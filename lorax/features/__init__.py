"""The feature store (:mod:`lorax.features.store`) and the views it is keyed by (:mod:`lorax.features.views`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lorax.features.store import FeatureStore

_MEMORY: FeatureStore | None = None
_OPEN: dict[tuple[str, float], FeatureStore] = {}  # one store per folder per process: its shards indexed once


def open_store(cache: Any, project: str | Path | None = None) -> FeatureStore:
    """The store of the ``cache:`` settings: ``features/`` in :func:`cache_root` ( the same object for the same folder within a process, which sees its own writes and reads another
    process's through :meth:`FeatureStore.refresh`), or with ``cache.enabled: false`` this process's in-memory store (shared by every caller, so a run
    computes each entry once either way and its results do not depend on the setting)."""
    global _MEMORY
    if not cache.enabled:
        if _MEMORY is None:
            _MEMORY = FeatureStore(None)
        return _MEMORY
    root = cache_root(cache, project)
    key = (str((root / "features").resolve()), float(cache.max_mb))
    if key not in _OPEN:  # opening a producer reads and checks its shards: once per process, not per step
        _OPEN[key] = FeatureStore(root / "features", cache.max_mb)
    return _OPEN[key]


def cache_root(cache: Any, project: str | Path | None = None) -> Path:
    """The cache folder: ``cache.dir``, or when it is null ``$LORAX_CACHE_DIR``, else ``cache`` (relative: from
    ``project``, else the working directory). The variable is where a machine keeps its cache without editing
    params.yaml, which DVC reads: pointing it elsewhere makes no stage stale (as ``MLFLOW_TRACKING_URI`` for
    ``tracking.uri``)."""
    root = Path(cache.dir if cache.dir is not None else os.environ.get("LORAX_CACHE_DIR") or "cache").expanduser()
    return Path(project) / root if not root.is_absolute() and project is not None else root


def decode_dir(cache: Any, project: str | Path | None = None) -> Path:
    """Where the decode cache (:mod:`lorax.data.cache`) lives: ``<cache folder>/decoded``."""
    return cache_root(cache, project) / "decoded"
