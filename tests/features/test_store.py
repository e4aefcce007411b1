"""The feature store: exact values, shards other processes wrote, damaged shards, producer keys, eviction, the
in-memory store, rows that travel to DataLoader workers, an unwritable cache folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lorax.features import cache_root, decode_dir, open_store, store as store_mod
from lorax.features.store import FORMAT, FeatureStore, StoreRows, hash_tensors, producer_key

KEY = "k" * 32


def _ids(n: int, start: int = 0) -> np.ndarray:
    return np.stack([np.frombuffer(hashlib.sha256(str(i).encode()).digest(), np.uint8)
                     for i in range(start, start + n)])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _odd_values(n: int, d: int = 3) -> torch.Tensor:
    """float32 values whose bits a lossy store would change: -0, subnormals, inf, nan, tiny and huge numbers."""
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    special = torch.tensor([-0.0, 1e-45, -3e-39, float("inf"), float("-inf"), float("nan"), 3.4e38, 1e-30])
    flat = v.view(-1)
    flat[: min(len(special), flat.numel())] = special[: flat.numel()]
    return v


def _stores(tmp_path: Path) -> list[FeatureStore]:
    return [FeatureStore(tmp_path / "features"), FeatureStore(None)]


@pytest.fixture(params=["disk", "memory"])
def store(request, tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "features") if request.param == "disk" else FeatureStore(None)


def test_values_round_trip_bit_for_bit(store) -> None:
    vals = _odd_values(8)
    store.add(KEY, _ids(8), vals)
    assert store.found(KEY, _ids(9)).tolist() == [True] * 8 + [False]
    got = store.get(KEY, _ids(8))
    assert got.dtype == torch.float32 and torch.equal(_bits(got), _bits(vals))
    assert torch.equal(_bits(store.get(KEY, _ids(3, 2)[::-1].copy())), _bits(vals[[4, 3, 2]]))  # any order, subset
    # float64 in: stored as float32, as computed values are
    store.add("other", _ids(2), np.array([[0.1, 0.2]], np.float64).repeat(2, 0))
    assert torch.equal(store.get("other", _ids(2)), torch.tensor([[0.1, 0.2]] * 2, dtype=torch.float32))
    assert store.persistent == (store.root is not None)


def test_other_processes_shards_are_seen_after_refresh(tmp_path) -> None:
    a = FeatureStore(tmp_path)
    b = FeatureStore(tmp_path)  # another process, which looked before anything was written
    assert not b.found(KEY, _ids(5)).any()
    vals = torch.randn(5, 4)
    a.add(KEY, _ids(5), vals)
    assert not b.found(KEY, _ids(5)).any()  # not until it looks again
    b.refresh(KEY)
    assert b.found(KEY, _ids(5)).all() and torch.equal(b.get(KEY, _ids(5)), vals)
    assert torch.equal(FeatureStore(tmp_path).get(KEY, _ids(5)), vals)  # and a store opened later sees it at once
    names = [p.name for p in (tmp_path / KEY).iterdir()]
    assert len(names) == 1 and names[0].endswith(".safetensors")  # no leftover staging file


def test_get_or_compute_computes_only_the_missing(store, monkeypatch) -> None:
    asked: list[list[int]] = []
    seen_found: list[list[bool]] = []
    table = torch.arange(40.0).view(10, 4)

    def compute(missing):
        asked.append(missing.tolist())
        for s in range(0, len(missing), 2):  # batches of positions, as view_batches yields them
            pos = missing[s:s + 2]
            yield pos, table[pos]

    def before(found):
        seen_found.append(found.tolist())

    ids = _ids(10)
    store.producer(KEY, {"part": "test"})  # first use: its description is written beside its shards
    store.add(KEY, ids[[1, 4]], table[[1, 4]])
    monkeypatch.setattr(store_mod, "FLUSH_BYTES", 2 * 4 * 4)  # a write every two rows
    got = store.get_or_compute(KEY, ids, compute, before=before)
    assert asked == [[0, 2, 3, 5, 6, 7, 8, 9]] and torch.equal(got, table)
    assert seen_found == [[i in (1, 4) for i in range(10)]]
    if store.persistent:  # one shard added first, then one per flush
        assert len(list((store.root / KEY).glob("*.safetensors"))) == 1 + 4
        assert json.loads((store.root / KEY / "producer.json").read_text()) == {"part": "test"}
    asked.clear()
    assert torch.equal(store.get_or_compute(KEY, ids[::-1].copy(), compute), table.flip(0))
    assert asked == []  # everything stored: nothing computed
    assert store.get_or_compute(KEY, _ids(3, 20), compute, read=False) is None and asked == [[0, 1, 2]]
    assert store.found(KEY, _ids(3, 20)).all()


@pytest.mark.parametrize("damage", ["bit", "truncated", "garbage", "empty", "no-checksum", "id-width", "lengths",
                                    "id-dtype"])
def test_a_damaged_or_malformed_shard_is_a_logged_miss(tmp_path, caplog, damage) -> None:
    from safetensors.numpy import save_file

    ids, vals = _ids(3), np.arange(9, dtype=np.float32).reshape(3, 3)
    FeatureStore(tmp_path).add(KEY, ids, vals)
    (shard,) = (tmp_path / KEY).glob("*.safetensors")
    good = shard.read_bytes()
    if damage == "bit":
        data = bytearray(good)
        data[-1] ^= 1  # one flipped bit in the values: the checksum no longer matches
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        shard.write_bytes(b"not a safetensors file")
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        bad_ids, bad_vals = ids, vals
        meta = None
        if damage == "id-width":
            bad_ids = np.zeros((3, 5), np.uint8)
        elif damage == "lengths":
            bad_vals = vals[:2]
        elif damage == "id-dtype":
            bad_ids = ids.astype(np.int16)
        if damage != "no-checksum":
            meta = {"sha256": store_mod._checksum(bad_ids, bad_vals)}  # a valid checksum: only the layout is wrong
        save_file({"ids": bad_ids, "values": bad_vals}, str(shard), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="lorax.features.store"):
        fresh = FeatureStore(tmp_path)
        assert not fresh.found(KEY, ids).any()  # a miss, not an error
    assert shard.name in caplog.text and "ignored" in caplog.text
    # and computing again works: the entries go to a new shard, read back exactly
    got = fresh.get_or_compute(KEY, ids, lambda missing: iter([(missing, torch.from_numpy(vals[missing]))]))
    assert torch.equal(got, torch.from_numpy(vals))
    assert FeatureStore(tmp_path).found(KEY, ids).all()
    # a half-written file of an interrupted writer is not a shard
    (tmp_path / KEY / ".x.safetensors.123.tmp").write_bytes(b"half")
    assert FeatureStore(tmp_path).found(KEY, ids).all()


def test_producer_key_changes_with_settings_and_tensors() -> None:
    t = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(2, dtype=torch.float16)}
    settings = {"part": "trunk", "crop": 16, "mean": [0.5, 0.5, 0.5], "compute": "cpu-fp32"}
    key = producer_key(settings, t)
    assert len(key) == 32 and key == producer_key(dict(reversed(settings.items())), dict(reversed(t.items())))
    # the key is the settings' JSON (with the format) followed by hash_tensors
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str).encode())
    assert key == hash_tensors(t, h).hexdigest()[:32]
    keys = {key}
    for name, value in [("part", "adapter"), ("crop", 224), ("mean", [0.5, 0.5, 0.4]), ("compute", "cuda-bf16"),
                        ("extra", None)]:
        keys.add(producer_key({**settings, name: value}, t))
    for changed in ({**t, "a": torch.ones(2, dtype=torch.float32)},  # same values, another dtype
                    {**t, "b": torch.arange(6.0).reshape(3, 2)},  # another shape
                    {**t, "b": torch.arange(6.0).reshape(2, 3) + 1e-3},  # other values
                    {"c": t["b"], "a": t["a"]},  # another name
                    {"a": t["a"]}):  # a tensor fewer
        keys.add(producer_key(settings, changed))
    assert len(keys) == 1 + 5 + 5
    assert producer_key(settings) == producer_key(settings, {})
    assert hash_tensors({"x": torch.zeros(2, 3)}).hexdigest() != hash_tensors({"x": torch.zeros(3, 2)}).hexdigest()


def _shard_of(root: Path, key: str) -> Path:
    (f,) = (root / key).glob("*.safetensors")
    return f


def test_eviction_removes_the_least_recently_used_shards(tmp_path) -> None:
    """Shards of every producer count towards cache.max_mb; the oldest last use (mtime) goes first, and a read
    counts as a use."""
    root = tmp_path / "features"
    rows = 1024  # 36 KiB per shard (32-byte ids, one float32 each)
    writer = FeatureStore(root)  # no limit
    shards = {}
    for i, key in enumerate(["a" * 32, "b" * 32, "c" * 32]):
        writer.add(key, _ids(rows, i * rows), np.full((rows, 1), i, np.float32))
        shards[key] = _shard_of(root, key)
    size = shards["a" * 32].stat().st_size
    for key, t in zip(shards, (1_000, 3_000, 2_000), strict=True):  # last used: a, then c, then b
        os.utime(shards[key], (t, t))
    limit_mb = 3.5 * size / 2**20  # room for three shards
    store = FeatureStore(root, max_mb=limit_mb)
    store.add("d" * 32, _ids(rows, 3 * rows), np.full((rows, 1), 3, np.float32))  # a fourth: one must go
    assert not shards["a" * 32].exists()
    assert shards["b" * 32].exists() and shards["c" * 32].exists() and _shard_of(root, "d" * 32).exists()
    # reading c makes it the most recently used: the next write evicts b, not c
    assert torch.equal(store.get("c" * 32, _ids(2, 2 * rows)), torch.full((2, 1), 2.0))
    assert shards["c" * 32].stat().st_mtime > 3_000
    store.add("e" * 32, _ids(rows, 4 * rows), np.full((rows, 1), 4, np.float32))
    assert not shards["b" * 32].exists() and shards["c" * 32].exists()
    fresh = FeatureStore(root)
    assert not fresh.found("a" * 32, _ids(1)).any() and not fresh.found("b" * 32, _ids(1, rows)).any()
    assert fresh.found("c" * 32, _ids(rows, 2 * rows)).all()
    assert sum(f.stat().st_size for f in root.glob("*/*.safetensors")) <= limit_mb * 2**20
    # no limit (0), or the in-memory store: nothing is ever deleted
    FeatureStore(root, max_mb=0).add("f" * 32, _ids(rows, 5 * rows), np.zeros((rows, 1), np.float32))
    assert len(list(root.glob("*/*.safetensors"))) == 4
    mem = FeatureStore(None, max_mb=1e-6)
    mem.add(KEY, _ids(rows), np.zeros((rows, 1), np.float32))
    assert mem.found(KEY, _ids(rows)).all()


def test_store_rows_pickle_by_folder_on_disk_and_by_values_in_memory(store) -> None:
    vals = _odd_values(6, 256)
    ids = _ids(6)
    store.add(KEY, ids, vals)
    order = ids[[5, 0, 3]]
    rows = store.reader(KEY, order)
    assert len(rows) == 3 and torch.equal(_bits(rows[0]), _bits(vals[5]))
    state = rows.__getstate__()
    blob = pickle.dumps(rows)
    back = pickle.loads(blob)
    assert isinstance(back, StoreRows) and len(back) == 3
    for a, b in zip(back, (vals[5], vals[0], vals[3]), strict=True):
        assert torch.equal(_bits(a), _bits(b))
    if store.persistent:  # the folder travels, not the values: workers re-open the shards
        assert set(state) == {"root", "key", "ids"} and state["root"] == store.root
        assert len(blob) < vals.numel() * 4 and back.store.root == store.root
    else:  # nothing on disk to re-open: the values travel
        assert set(state) == {"values", "ids"} and back.store.root is None
    empty = pickle.loads(pickle.dumps(store.reader(KEY, ids[:0])))
    assert len(empty) == 0


def test_open_store_follows_the_cache_settings(tmp_path, monkeypatch) -> None:
    from lorax import features

    cache = SimpleNamespace(enabled=True, dir="cache", max_mb=12.5)
    s = open_store(cache, tmp_path / "project")
    assert s.persistent and s.root == tmp_path / "project" / "cache" / "features" and s.max_mb == 12.5
    absolute = SimpleNamespace(enabled=True, dir=str(tmp_path / "elsewhere"), max_mb=0)
    assert open_store(absolute, tmp_path / "project").root == tmp_path / "elsewhere" / "features"
    monkeypatch.setattr(features, "_MEMORY", None)
    off = SimpleNamespace(enabled=False, dir=str(tmp_path / "unused"), max_mb=0)
    mem = open_store(off)
    assert not mem.persistent and open_store(off, tmp_path) is mem  # one store per process: computed once either way
    mem.add(KEY, _ids(1), torch.ones(1, 2))
    assert not (tmp_path / "unused").exists()


def test_an_unwritable_cache_dir_is_one_line_naming_the_setting(tmp_path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    store = open_store(SimpleNamespace(enabled=True, dir=str(blocked), max_mb=0))
    with pytest.raises(ValueError, match=r"^cache\.dir: cannot write the feature store under .*a-file") as e:
        store.get_or_compute(KEY, _ids(2), lambda m: iter([(m, torch.ones(len(m), 2))]), {"part": "trunk"})
    assert "\n" not in str(e.value) and "cache.enabled: false" in str(e.value)


def test_the_cache_folder_comes_from_the_setting_else_the_variable_else_cache(tmp_path, monkeypatch) -> None:
    """`cache.dir: null` lets a machine keep its cache anywhere ($LORAX_CACHE_DIR) without editing params.yaml (which
    DVC reads); a folder written in the settings wins; relative folders resolve from the project."""
    null, given = SimpleNamespace(dir=None), SimpleNamespace(dir="mine")
    monkeypatch.delenv("LORAX_CACHE_DIR", raising=False)
    assert cache_root(null, tmp_path) == tmp_path / "cache"
    monkeypatch.setenv("LORAX_CACHE_DIR", str(tmp_path / "far" / "away"))
    assert cache_root(null, tmp_path) == tmp_path / "far" / "away"
    assert decode_dir(null, tmp_path) == tmp_path / "far" / "away" / "decoded"
    assert cache_root(given, tmp_path) == tmp_path / "mine"
    monkeypatch.setenv("LORAX_CACHE_DIR", "rel")
    assert cache_root(null, tmp_path) == tmp_path / "rel"
    on = SimpleNamespace(enabled=True, dir=None, max_mb=0)
    assert open_store(on, tmp_path).root == tmp_path / "rel" / "features"
