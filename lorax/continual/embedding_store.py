"""Frozen adapters' embeddings, computed once per image and kept on disk.

A LoRAX adapter never changes after its task, and neither does the backbone under it, so adapter j's embedding of
an image's eval view (centre crop, or ``eval.crops`` crops averaged) is the same in every later evaluation,
exemplar selection and open-set calibration. Without a store, the evaluation after task k pushes every val image
of every task through all k adapters again (cost ~k^2 over a stream); with it, only the newest adapter sees the old
images and only the new task's images see the old adapters (cost ~k).

Entries are addressed by content, so a stale entry cannot be read: the adapter key hashes the adapter's tensors
(:func:`lorax.continual.shards.hash_tensors`), the backbone and adapter settings and the eval view; the image id is
the manifest's ``sha256`` of the file's bytes, which the loaders check on every read (and
:func:`lorax.data.manifest.verify_files` for rows found here), so an entry is only ever used for the bytes it was
computed from. The store is a cache (``eval.embedding_cache_dir``): deleting it only costs recomputation, and it is
not a DVC output.

Layout: ``<root>/<adapter key>/`` is one :class:`~lorax.continual.shards.ShardStore` with ``ids`` (N x 32 uint8:
image sha256) and ``emb`` (N x D float32).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lorax.continual.shards import ShardStore, hash_tensors

if TYPE_CHECKING:
    from lorax.config import Params

FORMAT = 2  # the version of the keys: images by the file's sha256


def image_ids(df: pd.DataFrame) -> np.ndarray:
    """(N, 32) uint8 content ids of the rows: the sha256 of the file's bytes (the hash the loaders verify)."""
    if "sha256" not in df.columns:
        raise ValueError("manifest lacks the sha256 column; re-run `lorax data prepare`")
    try:
        raw = [bytes.fromhex(h) for h in df["sha256"].astype(str)]
    except ValueError:
        raw = []
    if len(raw) != len(df) or any(len(b) != 32 for b in raw):
        raise ValueError("manifest sha256 values are not 64 hex digits; re-run `lorax data prepare`")
    return np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(-1, 32)


def adapter_key(adapter_tensors: dict[str, Any], settings: dict[str, Any]) -> str:
    """Hash of one adapter's tensors and everything else its embedding of an image depends on."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str).encode())
    return hash_tensors(adapter_tensors, h).hexdigest()[:32]


class EmbeddingStore:
    """Embeddings by (adapter key, image id); ``lookup`` finds what is there, ``add`` writes a new shard."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._stores: dict[str, ShardStore] = {}

    @classmethod
    def from_params(cls, params: Params, base: str | Path) -> EmbeddingStore | None:
        """The store at ``base / eval.embedding_cache_dir``, or None when ``eval.embedding_cache`` is off."""
        return cls(Path(base) / params.eval.embedding_cache_dir) if params.eval.embedding_cache else None

    def _store(self, key: str) -> ShardStore:
        if key not in self._stores:
            self._stores[key] = ShardStore(self.root / key, "emb")
        return self._stores[key]

    def lookup(self, key: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask (N,), embeddings (N, D) with zeros where not found; None when nothing was found)."""
        store = self._store(key)
        found = store.found(ids)
        if not found.any():
            return found, None
        rows = np.flatnonzero(found)
        got = store.get(ids[rows]).numpy()
        out = np.zeros((len(ids), got.shape[1]), dtype=np.float32)
        out[rows] = got
        return found, out

    def add(self, key: str, ids: np.ndarray, emb: np.ndarray) -> None:
        self._store(key).add(ids, np.asarray(emb, dtype=np.float32))
