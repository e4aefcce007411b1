"""The feature store: every tensor a frozen part of a model computed from one view of one image, kept once.

An entry is addressed by (producer, entry id). The producer (a folder) is what computed the tensor: a hash of the
producing tensors (:func:`hash_tensors`) and of every setting the output depends on (backbone, block range,
normalisation, precision...), see :func:`producer_key`. The entry id hashes the image's content digest (the
manifest's sha256, which the loaders verify) and the exact view fed in (:mod:`lorax.features.views`). So a changed
model, setting, image or view is a new address, never a stale value; adding images only adds entries.

Training (the frozen trunk's tokens and the old adapters' embeddings of the fixed training views), evaluation,
exemplar selection, the head and verdict fits and the detector all call :meth:`FeatureStore.get_or_compute`.
``cache.enabled: false`` keeps the entries in memory for the process only: the same calls, the same batches, the
same values, so results never depend on the cache (tests/features/test_store.py). On disk, values are float32 (what
was computed, bit for bit) in ``<cache.dir>/features/<producer>/<uuid>.safetensors`` shards with a checksum; a
damaged shard is a miss, never an error; ``cache.max_mb`` evicts the least recently used shards. No DVC stage
depends on the cache: moving or deleting it only costs recomputation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorax.utils.io import atomic_path

log = logging.getLogger(__name__)

ID_BYTES = 32
FORMAT = 3  # the version of producer keys and shard layout (the five caches before it used 1 and 2)
FLUSH_BYTES = 256 * 2**20  # computed values kept in memory before a shard is written
Batches = Iterable[tuple[np.ndarray, torch.Tensor]]  # (positions among the asked ids, their values)


def hash_tensors(tensors: Mapping[str, torch.Tensor], h: Any = None) -> Any:
    """Feed named tensors into a sha256 (``h``, or a new one) in name order: name, shape, dtype, then the bytes."""
    h = h if h is not None else hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + b"\0" + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h


def producer_key(settings: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> str:
    """The folder name of one producer: its settings (JSON) and the tensors that compute it."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str).encode())
    return hash_tensors(tensors or {}, h).hexdigest()[:32]


def _checksum(ids: np.ndarray, values: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ids).reshape(-1).view(np.uint8))
    h.update(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
    return h.hexdigest()


class _Producer:
    """One producer's entries: id -> value, from the shards on disk (memory-mapped rows) and this process's memory."""

    def __init__(self, folder: Path | None) -> None:
        self.dir = folder
        self._rows: list[Any] = []  # per source (shard or in-memory tensor): a row reader
        self._files: list[Path | None] = []
        self._where: dict[bytes, tuple[int, int]] = {}
        self._seen: set[str] = set()
        self._touched: set[int] = set()
        self.refresh()

    def refresh(self) -> None:
        """Index the shards written since the last look (by other processes too); damaged ones are skipped."""
        if self.dir is None or not self.dir.is_dir():
            return
        for f in sorted(self.dir.glob("*.safetensors")):
            if f.name not in self._seen:
                self._seen.add(f.name)
                opened = _open_shard(f)
                if opened is None:
                    log.warning("%s: damaged or foreign shard, ignored (its entries are computed again)", f)
                else:
                    self._index(*opened, f)

    def _index(self, ids: np.ndarray, rows: Any, file: Path | None) -> None:
        s = len(self._rows)
        self._rows.append(rows)
        self._files.append(file)
        for i, key in enumerate(ids):
            self._where.setdefault(key.tobytes(), (s, i))

    def found(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((i.tobytes() in self._where for i in ids), dtype=bool, count=len(ids))

    def one(self, item: np.ndarray | bytes) -> torch.Tensor:
        s, i = self._where[item if isinstance(item, bytes) else item.tobytes()]
        if s not in self._touched:  # least-recently-used order for eviction: a shard's mtime is its last use
            self._touched.add(s)
            if self._files[s] is not None:
                try:
                    os.utime(self._files[s])
                except OSError:
                    pass
        return self._rows[s][i]

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        if self.dir is None:
            self._index(ids, torch.from_numpy(values), None)
            return
        from safetensors.numpy import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / f"{uuid.uuid4().hex}.safetensors") as tmp:
            save_file({"ids": ids, "values": values}, str(tmp), metadata={"sha256": _checksum(ids, values)})
        self.refresh()


def _open_shard(path: Path) -> tuple[np.ndarray, Any] | None:
    """(ids, row reader of the values), or None when the shard is unreadable, malformed or fails its checksum."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        ids, values = handle.get_tensor("ids").numpy(), handle.get_tensor("values")
        ok = ids.dtype == np.uint8 and ids.ndim == 2 and ids.shape[1] == ID_BYTES and len(values) == len(ids)
        if not ok or (handle.metadata() or {}).get("sha256") != _checksum(ids, values.numpy()):
            return None
        return ids, handle.get_slice("values")
    except Exception:  # noqa: BLE001 - any failure to read a shard is a miss, never an error
        return None


class FeatureStore:
    """Values by (producer, id): :meth:`get_or_compute` for whole sets, :meth:`reader` for row-by-row reads.

    ``root``: the folder of the shards (None: in memory, for this process only); ``max_mb``: the disk size above
    which the least recently used shards are deleted after a write (0: no limit)."""

    def __init__(self, root: str | Path | None = None, max_mb: float = 0) -> None:
        self.root = Path(root) if root is not None else None
        self.max_mb = float(max_mb)
        self._producers: dict[str, _Producer] = {}
        self._bytes: int | None = None  # the store's size on disk as last measured plus what this process wrote

    @property
    def persistent(self) -> bool:
        return self.root is not None

    def producer(self, key: str, describe: Mapping[str, Any] | None = None) -> _Producer:
        if key not in self._producers:
            folder = self.root / key if self.root is not None else None
            if folder is not None and describe and not (folder / "producer.json").is_file():
                try:  # what computed these entries, for a person looking at the folder
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "producer.json").write_text(json.dumps(describe, indent=1, sort_keys=True, default=str))
                except OSError as e:
                    raise ValueError(f"cache.dir: cannot write the feature store under {self.root} "
                                     f"({e.strerror or e}); point cache.dir at a writable folder or set "
                                     "cache.enabled: false") from None
            self._producers[key] = _Producer(folder)
        return self._producers[key]

    def found(self, key: str, ids: np.ndarray) -> np.ndarray:
        """(N,) bool: which ids the producer holds."""
        return self.producer(key).found(ids)

    def get(self, key: str, ids: np.ndarray) -> torch.Tensor:
        """(N, ...) float32 values of ``ids`` (all present)."""
        p = self.producer(key)
        return torch.stack([torch.as_tensor(p.one(i)) for i in ids]) if len(ids) else torch.zeros(0)

    def add(self, key: str, ids: np.ndarray, values: torch.Tensor | np.ndarray) -> None:
        if len(ids) == 0:
            return
        v = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        v = np.ascontiguousarray(v, dtype=np.float32)
        self.producer(key).add(np.ascontiguousarray(ids, dtype=np.uint8), v)
        if self._bytes is not None:
            self._bytes += v.nbytes + len(ids) * ID_BYTES
        if self._bytes is None or self._bytes > self.max_mb * 2**20:
            self.evict()

    def get_or_compute(self, key: str, ids: np.ndarray, compute: Callable[[np.ndarray], Batches],
                       describe: Mapping[str, Any] | None = None, read: bool = True,
                       before: Callable[[np.ndarray], None] | None = None) -> torch.Tensor | None:
        """The values of ``ids`` (N x 32 uint8): the stored ones read, the missing ones computed and stored.

        ``compute(positions)`` yields ``(positions, values)`` batches for the missing positions (into ``ids``);
        they are written every :data:`FLUSH_BYTES`. ``before(found)``: called with the found mask first (to check
        the files of rows that will not be decoded). ``read``: False to only fill (returns None)."""
        p = self.producer(key, describe)
        found = p.found(ids)
        if before is not None:
            before(found)
        missing = np.flatnonzero(~found)
        if len(missing):
            t0 = time.perf_counter()
            self._fill(key, ids, compute(missing))
            log.debug("feature store %s: %d of %d computed (%.1f s)", key[:8], len(missing), len(ids),
                      time.perf_counter() - t0)
        return self.get(key, ids) if read else None

    def _fill(self, key: str, ids: np.ndarray, batches: Batches) -> None:
        pend_pos, pend_val, size = [], [], 0
        for pos, val in batches:
            pend_pos.append(np.asarray(pos)), pend_val.append(val.detach().float().cpu())
            size += val.numel() * 4
            if size >= FLUSH_BYTES:
                self.add(key, ids[np.concatenate(pend_pos)], torch.cat(pend_val))
                pend_pos, pend_val, size = [], [], 0
        if pend_pos:
            self.add(key, ids[np.concatenate(pend_pos)], torch.cat(pend_val))

    def refresh(self, key: str) -> None:
        """See the shards other processes (DDP ranks) wrote for ``key``."""
        self.producer(key).refresh()

    def reader(self, key: str, ids: np.ndarray) -> StoreRows:
        """Row ``i`` -> the value of ``ids[i]``, for a Dataset (worker processes re-open the shards)."""
        return StoreRows(self, key, ids)

    def evict(self) -> None:
        """Delete the least recently used shards until the store is within ``max_mb`` (a no-op in memory)."""
        if self.root is None or self.max_mb <= 0:
            return
        shards = []
        for f in self.root.glob("*/*.safetensors"):
            try:
                st = f.stat()
            except OSError:  # another process evicted it meanwhile
                continue
            shards.append((st.st_mtime, st.st_size, f))
        total, limit = sum(s for _, s, _ in shards), self.max_mb * 2**20
        for _, size, f in sorted(shards):
            if total <= limit:
                break
            f.unlink(missing_ok=True)  # a process that mapped it keeps reading it; others compute it again
            total -= size
            log.info("feature store: evicted %s (cache.max_mb %g)", f, self.max_mb)
        self._bytes = total


class StoreRows:
    """``rows[i]``: the stored value of ``ids[i]``; pickles as the store's folder, not its contents."""

    def __init__(self, store: FeatureStore, key: str, ids: np.ndarray) -> None:
        self.store, self.key, self.ids = store, key, ids
        self._p = store.producer(key)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.as_tensor(self._p.one(self.ids[int(i)])).float()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict:
        if not self.store.persistent:  # in memory: the values themselves travel
            return {"values": torch.stack(list(self)) if len(self) else torch.zeros(0), "ids": self.ids}
        return {"root": self.store.root, "key": self.key, "ids": self.ids}

    def __setstate__(self, state: dict) -> None:
        store = FeatureStore(state.get("root"))
        if "values" in state:
            store.add("rows", state["ids"], state["values"])
            self.__init__(store, "rows", state["ids"])
        else:
            self.__init__(store, state["key"], state["ids"])
