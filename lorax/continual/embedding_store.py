"""Frozen adapters' embeddings, computed once per image and kept on disk.

A LoRAX adapter never changes after its task, and neither does the backbone under it, so adapter j's embedding of
an image's eval view (centre crop, or ``eval.crops`` crops averaged) is the same in every later evaluation,
exemplar selection and open-set calibration. Without a store, the evaluation after task k pushes every val image
of every task through all k adapters again (cost ~k^2 over a stream); with it, only the newest adapter sees the old
images and only the new task's images see the old adapters (cost ~k).

Entries are addressed by content, so a stale entry cannot be read: the adapter key hashes the adapter's tensors,
the backbone and adapter settings and the eval view; the image key is the manifest's ``sha256`` of the file's
bytes, which the loaders check on every read (and :func:`lorax.data.manifest.verify_files` for rows found here), so
an entry is only ever used for the bytes it was computed from. (Keying by ``pixel_sha256``, which nothing checks,
let an edited manifest pull another image's embedding.) The store is a
cache (``eval.embedding_cache_dir``, default ``cache/embeddings``): deleting it only costs recomputation, and it
is not a DVC output. Writers add new shard files atomically (``.tmp`` + rename), so concurrent stages never see
half a file.

Layout: ``<root>/<adapter key>/<shard>.safetensors`` with ``ids`` (N x 32 uint8: image sha256) and ``emb`` (N x D
float32).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from lorax.utils.io import atomic_path

if TYPE_CHECKING:
    from lorax.config import Params

FORMAT = 2  # 2: images keyed by the file's sha256 (1: by pixel_sha256)


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
    import torch

    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str).encode())
    for name in sorted(adapter_tensors):
        t = adapter_tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + b"\0" + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class EmbeddingStore:
    """Embeddings by (adapter key, image id); ``lookup`` finds what is there, ``add`` writes a new shard."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._loaded: dict[str, dict[bytes, np.ndarray]] = {}

    @classmethod
    def from_params(cls, params: Params, base: str | Path) -> EmbeddingStore | None:
        """The store at ``base / eval.embedding_cache_dir``, or None when ``eval.embedding_cache`` is off."""
        return cls(Path(base) / params.eval.embedding_cache_dir) if params.eval.embedding_cache else None

    def _entries(self, key: str) -> dict[bytes, np.ndarray]:
        if key not in self._loaded:
            from safetensors.numpy import load_file

            entries: dict[bytes, np.ndarray] = {}
            folder = self.root / key
            for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
                try:
                    t = load_file(str(f))
                except Exception:  # a damaged shard is a cache miss, never an error
                    continue
                for i, e in zip(t["ids"], t["emb"], strict=True):
                    entries[i.tobytes()] = e
            self._loaded[key] = entries
        return self._loaded[key]

    def lookup(self, key: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask (N,), embeddings (N, D) with zeros where not found; None when nothing was found)."""
        entries = self._entries(key)
        found = np.array([i.tobytes() in entries for i in ids], dtype=bool)
        if not found.any():
            return found, None
        d = len(next(iter(entries.values())))
        out = np.zeros((len(ids), d), dtype=np.float32)
        for r in np.flatnonzero(found):
            out[r] = entries[ids[r].tobytes()]
        return found, out

    def add(self, key: str, ids: np.ndarray, emb: np.ndarray) -> None:
        if len(ids) == 0:
            return
        from safetensors.numpy import save_file

        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{uuid.uuid4().hex}.safetensors") as tmp:
            save_file({"ids": np.ascontiguousarray(ids, dtype=np.uint8),
                       "emb": np.ascontiguousarray(emb, np.float32)}, str(tmp))
        entries = self._entries(key)
        for i, e in zip(ids, emb, strict=True):
            entries[i.tobytes()] = np.asarray(e, dtype=np.float32)
