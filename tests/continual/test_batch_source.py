"""One task's training batches: K fixed views per image (the same in every task), each row once per epoch, LoRAX's
steps on stored trunk tokens and old embeddings, fresh crops with train.views 0, and the same trained model
whether the feature store is on disk or in memory."""

from __future__ import annotations

import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lorax.continual.batch_source import BatchSource
from lorax.continual.batches import dataset_for
from lorax.continual.distributed import DistContext
from lorax.continual.frozen_parts import trunk_producer
from lorax.continual.methods import Frozen, build_method
from lorax.data.manifest import ManifestError
from lorax.features.store import FeatureStore
from tests.helpers import prepared_zoo, store_params

CPU = torch.device("cpu")
TOL = {"rtol": 1e-5, "atol": 1e-5}
FIRST, SECOND = "deconv", "nnconv"


def _params(root: Path, **ov):
    return store_params(root, **ov)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The tiny two-task zoo, prepared (12 train images per class and task)."""
    root = tmp_path_factory.mktemp("batches")
    return root, prepared_zoo(root, _params(root))


def _method(params, tasks=("a",)):
    torch.manual_seed(0)
    method = build_method(params, list(tasks))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in tasks if method.frozen_task_adapters else ():
            for p in method.net.adapters.parameters(t):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return method


def _rows(manifests, task=FIRST) -> pd.DataFrame:
    df = manifests[task]
    return df[df["split"] == "train"].reset_index(drop=True)


def _key(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().numpy().tobytes()


def _slot_of(values: torch.Tensor) -> dict[bytes, int]:
    """Each view's value (its trunk tokens or its pixels) -> its slot."""
    return {_key(v): s for s, v in enumerate(values)}


def _epoch_rows(source: BatchSource, seed: int, slot_of: dict[bytes, int], class_ids: np.ndarray) -> list[int]:
    """The slots of one epoch's batches, in order, each found from its input; targets checked on the way."""
    out = []
    for b in source.epoch(seed):
        x = b.x.trunk if isinstance(b.x, Frozen) else b.x
        assert b.n_mine == len(x) == len(b.targets) and b.weight == 1.0
        for xi, y in zip(x, b.targets.tolist(), strict=True):
            s = slot_of[_key(xi)]
            assert y == class_ids[s // source.views.k]
            out.append(s)
    return out


@pytest.mark.parametrize("method_name", ["lorax", "finetune"])
def test_every_row_once_per_epoch_with_one_of_its_views(zoo, tmp_path, method_name):
    _, manifests = zoo
    params = _params(tmp_path, train__views=3, continual__method=method_name)
    method = _method(params)
    rows = _rows(manifests)
    store = FeatureStore(tmp_path / "features")
    source = BatchSource(rows, method, params, 7, CPU, DistContext(), store)
    views = source.views
    assert views.k == 3 and views.rows == len(rows) and source.old is None
    assert len(source) == -(-len(rows) // params.train.batch_size)
    if method_name == "lorax":  # steps on the stored trunk tokens of the fixed views
        values = store.get(trunk_producer(method, params, CPU)[0], views.ids)
        # the slots as DataLoader workers get them (pickled: the store's folder travels, the shards are re-opened)
        slots = pickle.loads(pickle.dumps(source.slots))
        x, y, s = slots[5]
        assert torch.equal(x, values[5]) and y == rows["class_id"].iloc[2] and s == 5
    else:  # the fixed views' pixels; nothing stored
        base = dataset_for(rows, method, params, True, 0)
        values = torch.stack([base[(s // 3, int(views.seeds[s // 3, s % 3]))][0] for s in range(len(views.ids))])
        assert not store.root.exists()
    slot_of = _slot_of(values)
    class_ids = rows["class_id"].to_numpy()
    epochs = [_epoch_rows(source, seed, slot_of, class_ids) for seed in (11, 12, 13)]
    for slots in epochs:
        assert sorted(s // 3 for s in slots) == list(range(len(rows)))  # each row once, with one of its views
    assert epochs[0] != epochs[1]  # order and view change with the epoch
    assert len({s % 3 for e in epochs for s in e}) == 3  # every view index is used
    assert _epoch_rows(source, 11, slot_of, class_ids) == epochs[0]  # and are reproducible


def test_views_and_trunk_tokens_are_reused_in_the_next_task(zoo, tmp_path):
    """Task 1 replays some of task 0's rows: their views are the same, their trunk tokens are not computed again,
    and a step (the newest adapter on the tokens, the old adapter's stored embeddings) is the plain forward."""
    _, manifests = zoo
    params = _params(tmp_path, train__views=2)
    store = FeatureStore(tmp_path / "features")
    method = _method(params, ("a",))
    rows0 = _rows(manifests)
    src0 = BatchSource(rows0, method, params, 1, CPU, DistContext(), store)
    key = trunk_producer(method, params, CPU)[0]
    assert store.found(key, src0.views.ids).all()
    new = _rows(manifests, SECOND)
    replayed = rows0.iloc[[3, 0, 7, 11]]
    rows1 = pd.concat([new, replayed], ignore_index=True)
    method.add_task("b")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in method.net.adapters.parameters("b"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    computed = Counter()
    trunk = method.net.trunk
    method.net.trunk = lambda x: computed.update(trunk=len(x)) or trunk(x)
    src1 = BatchSource(rows1, method, params, 2, CPU, DistContext(), store)
    method.net.trunk = trunk
    assert computed["trunk"] == 2 * len(new)  # the replayed rows' views: read back, not computed
    for i, r in enumerate([3, 0, 7, 11]):
        slot = 2 * (len(new) + i)
        assert np.array_equal(src1.views.ids[slot:slot + 2], src0.views.ids[2 * r:2 * r + 2])
    assert src1.old.shape == (2 * len(rows1), 1, method.net.embed_dim)
    # a step: the batch's old embeddings belong to its tokens' views, and the whole is the plain forward
    tokens = store.get(key, src1.views.ids)
    slot_of = _slot_of(tokens)
    base = dataset_for(rows1, method, params, True, 0)
    method.train()
    batch = next(iter(src1.epoch(5)))
    assert batch.x.old.shape == (1, len(batch.targets), method.net.embed_dim)
    slots = [slot_of[_key(t)] for t in batch.x.trunk]
    x = torch.stack([base[(s // 2, int(src1.views.seeds[s // 2, s % 2]))][0] for s in slots])
    with torch.no_grad():
        torch.testing.assert_close(batch.x.old[0], method.net.embeddings(x, ["a"])[0], **TOL)
        got, want = method(batch.x), method(x)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)


def test_views_zero_gives_fresh_crops_and_stores_nothing(zoo, tmp_path):
    _, manifests = zoo
    params = _params(tmp_path, train__views=0)
    method = _method(params, ("a", "b"))
    rows = _rows(manifests)
    store = FeatureStore(tmp_path / "features")
    source = BatchSource(rows, method, params, 3, CPU, DistContext(), store)
    assert source.views is None and source.old is None
    crops: dict[int, set[bytes]] = {}
    for seed in range(4):
        n = 0
        for x, _, row in source._loader(seed):  # (images, class ids, rows)
            for xi, r in zip(x, row.tolist(), strict=True):
                crops.setdefault(r, set()).add(_key(xi))
            n += len(x)
        assert n == len(rows)
    assert max(len(c) for c in crops.values()) > 2  # not K fixed views: a new random crop every epoch
    batch = next(iter(source.epoch(0)))
    assert isinstance(batch.x, torch.Tensor) and batch.x.dim() == 4  # images: every adapter runs on them
    assert not store.root.exists()


def _copy_rows(rows: pd.DataFrame, root: Path) -> pd.DataFrame:
    out = rows.copy()
    for i in out.index:
        dst = root / out.loc[i, "path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(out.loc[i, "root"]) / out.loc[i, "path"], dst)
    out["root"] = str(root)
    return out


def test_a_training_row_read_wholly_from_the_store_is_still_checked(zoo, tmp_path):
    _, manifests = zoo
    params = _params(tmp_path, train__views=2)
    store = FeatureStore(tmp_path / "features")
    method = _method(params, ("a", "b"))
    rows = _copy_rows(_rows(manifests).head(6), tmp_path / "data")
    BatchSource(rows, method, params, 1, CPU, DistContext(), store)  # every view's tokens and old embeddings
    path = Path(rows["root"].iloc[4]) / rows["path"].iloc[4]
    a = np.asarray(Image.open(path).convert("RGB")).copy()
    a[0, 0] ^= 255
    Image.fromarray(a).save(path)
    with pytest.raises(ManifestError, match="changed since the manifest was written") as e:
        BatchSource(rows, method, params, 1, CPU, DistContext(), store)
    assert rows["path"].iloc[4] in str(e.value)


def _state_tensors(state: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(state.rglob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            out[f"{f.relative_to(state)}:{name}"] = t.contiguous().view(torch.uint8).numpy().tobytes() \
                if t.numel() else b""
    return out


def _train_stream(manifests, params, out: Path) -> list[dict[str, bytes]]:
    """Two tasks as `lorax train` runs them (train, then exemplar selection for the next): each state's tensors."""
    from lorax.continual.selection import select_exemplars
    from lorax.continual.state import load_state
    from lorax.continual.trainer import train_task

    memory, prev, states = None, None, []
    for task in (FIRST, SECOND):
        prev = train_task(prev, manifests[task], memory, params, out / task)
        method, _ = load_state(prev, params=params)
        memory = select_exemplars(method, manifests[task], memory, params)
        states.append(_state_tensors(prev))
    return states


@pytest.mark.parametrize("blocks", ["last_k", "all"])
def test_cache_on_or_off_trains_bit_identical_models(zoo, tmp_path, monkeypatch, blocks):
    """The store on disk (filled, then read back by a second run) or in memory: the same states, bit for bit."""
    from lorax import features

    _, manifests = zoo
    on = _params(tmp_path, adapter__blocks=blocks, train__epochs=2)
    on_states = _train_stream(manifests, on, tmp_path / "on")
    shards = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert shards  # the store was really used
    again = _train_stream(manifests, on, tmp_path / "again")  # everything read back from the disk store
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == shards  # nothing computed again
    monkeypatch.setattr(features, "_MEMORY", None)  # this process's in-memory store, empty
    off = _params(tmp_path, adapter__blocks=blocks, train__epochs=2, cache__enabled=False,
                  cache__dir=str(tmp_path / "unused"))
    off_states = _train_stream(manifests, off, tmp_path / "off")
    assert not (tmp_path / "unused").exists()
    from lorax.continual.state import read_info

    epochs = read_info(tmp_path / "on" / SECOND)["epochs"]
    assert len(epochs) == 2 and all(np.isfinite(e["loss"]) for e in epochs)
    for name, other in (("read back", again), ("in memory", off_states)):
        for task, a, b in zip((FIRST, SECOND), on_states, other, strict=True):
            assert a.keys() == b.keys()
            differ = [k for k in a if a[k] != b[k]]
            assert not differ, f"{name}, task {task}: tensors differ: {differ}"


def test_an_unwritable_cache_dir_is_one_line(zoo, tmp_path):
    from lorax.continual.trainer import train_task

    _, manifests = zoo
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    bad = _params(tmp_path, cache__dir=str(blocked))
    with pytest.raises(ValueError, match=r"^cache\.dir: cannot write the feature store under .*a-file") as e:
        train_task(None, manifests[FIRST], None, bad, tmp_path / "s")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()
