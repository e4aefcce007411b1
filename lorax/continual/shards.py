"""One on-disk, content-addressed store of per-item tensors, and the one hasher of named tensors its keys use.

Both caches that outlive a process keep their values here: the frozen trunk's tokens of a crop
(:mod:`lorax.continual.trunk_cache`) and a frozen adapter's embedding of an image
(:mod:`lorax.continual.embedding_store`). Their folder is a hash of everything the values depend on
(:func:`hash_tensors` over the model's tensors, plus settings), and each item is addressed by a 32-byte id derived
from its content, so a stale entry cannot be read: a changed model or image is a new key, never a wrong value.

Layout: ``<folder>/<uuid>.safetensors``, written and read through the ``safetensors`` library, each with ``ids``
(N x 32 uint8) and one value tensor (N x ...), and a sha256 of both in the header's metadata. Values are read row by
row from the memory-mapped file (never loaded whole); a shard is written as ``.tmp`` + rename, so a reader never
sees half of one; a shard that fails to open or to match its checksum is skipped (a miss, never an error).
Deleting the folder only costs recomputation.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorax.utils.io import atomic_path

log = logging.getLogger(__name__)

ID_BYTES = 32
_OLD_FORMAT = object()  # _open's answer for a shard written before shards carried their checksum


def hash_tensors(tensors: Mapping[str, torch.Tensor], h: Any = None) -> Any:
    """Feed named tensors into a sha256 (``h``, or a new one) in name order: name, shape, dtype, then the raw bytes.

    The one hasher of model tensors: the trunk cache's folder (the frozen trunk's tensors) and the embedding
    store's adapter keys (one adapter's tensors) both come from it, so the same tensors always give the same key."""
    h = h if h is not None else hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + b"\0" + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h


def _checksum(ids: np.ndarray, values: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ids).reshape(-1).view(np.uint8))
    h.update(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
    return h.hexdigest()


class ShardStore:
    """Values by 32-byte id in one folder of safetensors shards: ``found``, ``one``/``get`` (row reads), ``add``.

    ``value``: the name of the value tensor in a shard (``tokens``, ``emb``); ``half``: store values as float16
    (float32 for a shard whose values overflow float16); ``verify``: check each shard's checksum when first
    indexed (off only where a parent process already did)."""

    def __init__(self, folder: str | Path, value: str, half: bool = False, verify: bool = True) -> None:
        self.dir = Path(folder)
        self.value, self.half, self.verify = value, half, verify
        self._rows: list[Any] = []  # per shard: the value tensor's row reader
        self._where: dict[bytes, tuple[int, int]] = {}
        self._seen: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Index the shards written since the last look (by other processes too); damaged ones are skipped."""
        for f in sorted(self.dir.glob("*.safetensors")) if self.dir.is_dir() else []:
            if f.name in self._seen:
                continue
            self._seen.add(f.name)
            opened = self._open(f)
            if opened is None:
                log.warning("%s: damaged shard, ignored (its entries are computed again)", f)
                continue
            if opened is _OLD_FORMAT:
                log.info("%s: shard of an older lorax (no checksum), ignored (its entries are computed again; "
                         "delete the folder to drop it)", f)
                continue
            ids, rows = opened
            s = len(self._rows)
            self._rows.append(rows)
            for i, key in enumerate(ids):
                self._where.setdefault(key.tobytes(), (s, i))

    def _open(self, path: Path) -> tuple[np.ndarray, Any] | object | None:
        """(ids, row reader of the values); None when the shard is unreadable, malformed or fails its checksum;
        ``_OLD_FORMAT`` when it has no checksum (an older lorax wrote it)."""
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
            ids = handle.get_tensor("ids").numpy()
            rows = handle.get_slice(self.value)
            shape = rows.get_shape()
            if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != ID_BYTES or not shape or shape[0] != len(ids):
                return None
            if self.verify:
                meta = handle.metadata() or {}
                if "sha256" not in meta:  # written before shards carried their checksum: stale, not damaged
                    return _OLD_FORMAT
                values = handle.get_tensor(self.value)
                raw = values.view(torch.int16) if values.dtype == torch.bfloat16 else values
                if meta.get("sha256") != _checksum(ids, raw.numpy()):
                    return None
            return ids, rows
        except Exception:  # noqa: BLE001 - any failure to read a shard is a cache miss, never an error
            return None

    def __len__(self) -> int:
        return len(self._where)

    def found(self, ids: np.ndarray) -> np.ndarray:
        """(N,) bool: which of ``ids`` (N x 32 uint8) the store holds."""
        return np.array([i.tobytes() in self._where for i in ids], dtype=bool)

    def one(self, item: np.ndarray | bytes) -> torch.Tensor:
        """The float32 value of one id (it must be present)."""
        s, i = self._where[item if isinstance(item, bytes) else item.tobytes()]
        return self._rows[s][i].float()

    def get(self, ids: np.ndarray) -> torch.Tensor:
        """(N, ...) float32 values of ``ids`` (all must be present)."""
        return torch.stack([self.one(i) for i in ids])

    def add(self, ids: np.ndarray, values: torch.Tensor | np.ndarray) -> None:
        """Write one shard of ``ids`` and their ``values`` and index it; OSError when the folder is not writable."""
        if len(ids) == 0:
            return
        from safetensors.numpy import save_file

        v = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        v = np.ascontiguousarray(v, dtype=np.float32)
        if self.half:
            with np.errstate(over="ignore"):
                half = v.astype(np.float16)
            if not (np.isfinite(v).all() and not np.isfinite(half).all()):  # a value beyond float16: keep float32
                v = half
        ids = np.ascontiguousarray(ids, dtype=np.uint8)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / f"{uuid.uuid4().hex}.safetensors") as tmp:
            save_file({"ids": ids, self.value: v}, str(tmp), metadata={"sha256": _checksum(ids, v)})
        self.refresh()
