"""The one shard store and the one tensor hasher behind the trunk cache and the embedding store."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from lorax.continual.embedding_store import FORMAT, EmbeddingStore, adapter_key
from lorax.continual.shards import ShardStore, hash_tensors
from lorax.continual.trunk_cache import TrunkCache


def _ids(n: int, start: int = 0) -> np.ndarray:
    return np.stack([np.frombuffer(hashlib.sha256(str(i).encode()).digest(), np.uint8) for i in range(start, start + n)])


def test_values_round_trip_and_other_processes_see_new_shards(tmp_path) -> None:
    a = ShardStore(tmp_path / "k", "emb")
    b = ShardStore(tmp_path / "k", "emb")  # another process's view, opened before anything was written
    vals = torch.randn(5, 3)
    a.add(_ids(5), vals)
    assert a.found(_ids(6)).tolist() == [True] * 5 + [False] and len(a) == 5
    assert torch.equal(a.get(_ids(5)), vals)  # float32 store: exact
    assert not b.found(_ids(5)).any()
    b.refresh()
    assert torch.equal(b.one(_ids(1, 2)[0]), vals[2])
    assert [p.suffix for p in (tmp_path / "k").iterdir()] == [".safetensors"]  # no leftover staging file


def test_half_store_keeps_float16_unless_a_value_overflows(tmp_path) -> None:
    store = ShardStore(tmp_path / "t", "tokens", half=True)
    small = torch.randn(2, 4, 3)
    store.add(_ids(2), small)
    assert torch.equal(store.get(_ids(2)), small.half().float())
    big = torch.full((1, 4, 3), 1e6)  # beyond float16: stored as float32, exact
    store.add(_ids(1, 10), big)
    assert torch.equal(store.get(_ids(1, 10)), big)
    from safetensors import safe_open

    dtypes = sorted(str(safe_open(str(f), "pt").get_slice("tokens").get_dtype()) for f in store.dir.iterdir())
    assert dtypes == ["F16", "F32"]


def test_a_shard_that_fails_its_checksum_or_shape_is_a_miss(tmp_path) -> None:
    from safetensors.numpy import save_file

    store = ShardStore(tmp_path / "k", "emb")
    store.add(_ids(2), np.ones((2, 3), np.float32))
    (shard,) = store.dir.glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one flipped bit in the values: the checksum no longer matches
    shard.write_bytes(bytes(data))
    assert not ShardStore(tmp_path / "k", "emb").found(_ids(2)).any()
    save_file({"ids": np.zeros((2, 5), np.uint8), "emb": np.ones((2, 3), np.float32)}, str(shard))  # wrong id width
    assert len(ShardStore(tmp_path / "k", "emb")) == 0


def test_one_hasher_for_trunk_and_adapter_keys() -> None:
    """Adapter keys are the settings' JSON followed by hash_tensors; the order of the tensors does not matter."""
    t = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(2, dtype=torch.float16)}
    settings = {"view": 1}
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str).encode())
    assert adapter_key(t, settings) == hash_tensors(t, h).hexdigest()[:32]
    assert adapter_key(dict(reversed(t.items())), settings) == adapter_key(t, settings)
    changed = {**t, "a": torch.ones(2, dtype=torch.float32)}  # same values, another dtype: another key
    assert adapter_key(changed, settings) != adapter_key(t, settings)
    assert hash_tensors({"x": torch.zeros(2, 3)}).hexdigest() != hash_tensors({"x": torch.zeros(3, 2)}).hexdigest()


def test_both_caches_are_the_one_store(tmp_path) -> None:
    assert issubclass(TrunkCache, ShardStore)
    emb = EmbeddingStore(tmp_path)
    emb.add("k", _ids(2), np.ones((2, 4), np.float32))
    assert isinstance(emb._store("k"), ShardStore)
    found, got = EmbeddingStore(tmp_path).lookup("k", _ids(3))
    assert found.tolist() == [True, True, False] and got.shape == (3, 4) and (got[2] == 0).all()


def test_a_shard_without_checksum_is_stale_not_damaged(tmp_path, caplog) -> None:
    """Shards written before the checksum existed are ignored (recomputed) and said to be old, not damaged."""
    import logging

    from safetensors.numpy import save_file

    ids = np.arange(64, dtype=np.uint8).reshape(2, 32)
    save_file({"ids": ids, "emb": np.ones((2, 3), np.float32)}, str(tmp_path / "old.safetensors"))
    with caplog.at_level(logging.INFO, logger="lorax.continual.shards"):
        store = ShardStore(tmp_path, "emb")
    assert not store.found(ids).any()
    assert "older lorax" in caplog.text and "damaged" not in caplog.text
    store.add(ids, np.zeros((2, 3), np.float32))  # recomputed values take their place
    assert store.found(ids).all() and float(store.one(ids[0]).sum()) == 0.0
