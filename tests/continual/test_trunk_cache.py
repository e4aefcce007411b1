"""Frozen-trunk cache: content addressing, cached logits equal uncached, same training result, damaged shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lorax.continual.batches import dataset_for, loader_for
from lorax.continual.feature_cache import FrozenFeatureCache
from lorax.continual.methods import build_method
from lorax.continual.trunk_cache import (
    TrunkCache,
    content_seeds,
    eval_ids,
    open_trunk_cache,
    train_ids,
    wants_trunk_cache,
)
from tests.helpers import TINY_OVERRIDES, tiny_params

CPU = torch.device("cpu")
NO_AMP = torch.autocast("cpu", enabled=False)
# depth 3, adapters in the last block only: blocks 0-1 are the frozen trunk (the ConViT class token joins at 1)
DEEP = {**TINY_OVERRIDES["model.kwargs"], "depth": 3}
# fp16 tokens: relative rounding 2**-11 of the trunk's output; measured logit differences here stay below 1e-3
TOL = {"rtol": 1e-2, "atol": 5e-3}


def _params(root: Path, **ov):
    base = {"adapter__blocks": "last_k", "adapter__last_k": 1, "adapter__dropout": 0.0, "model__kwargs": DEEP,
            "train__trunk_cache": True, "train__trunk_cache_dir": str(root / "trunk")}
    return tiny_params(root, **{**base, **ov})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The tiny two-task zoo, prepared (12 train images per class and task)."""
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    root = tmp_path_factory.mktemp("tcache")
    params = _params(root)
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    return root, load_stream_manifests(params.data.manifests, params.tasks)


def _method(params, tasks=("a", "b")):
    torch.manual_seed(0)
    method = build_method(params, list(tasks))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in tasks:
            for p in method.net.adapters.parameters(t):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return method.eval()


def _train_rows(manifests, task="deconv") -> pd.DataFrame:
    df = manifests[task]
    return df[df["split"] == "train"].reset_index(drop=True)


def _fill_train(trunk, method, params, rows, seeds):
    base = dataset_for(rows, method, params, True, 0)
    ids = train_ids(base, rows, seeds)
    todo = np.flatnonzero(~trunk.found(ids)).tolist()
    slots = FrozenFeatureCache(len(rows), seeds.shape[1], 0, seeds)
    if todo:
        loader = torch.utils.data.DataLoader(slots.dataset(base), batch_size=16, sampler=todo)
        trunk.fill(method.net, loader, ids, CPU, NO_AMP)
    return base, slots, ids, len(todo)


# feature levels below the branch and the residual spectrum travel with the cached tokens
@pytest.mark.parametrize("levels,spectrum", [([], None), ([1, 3], None), ([1], {"grid": 4, "sigma": 1.0})])
def test_cached_step_logits_equal_the_uncached_forward(zoo, tmp_path, levels, spectrum):
    root, manifests = zoo
    params = _params(tmp_path, model__feature_levels=levels, model__spectrum=spectrum)
    method = _method(params)
    assert method.net.branch_block == 2
    trunk = open_trunk_cache(method, params, CPU)
    rows = _train_rows(manifests)
    seeds = content_seeds(rows, 2)
    base, slots, ids, computed = _fill_train(trunk, method, params, rows, seeds)
    assert computed == len(ids) == 2 * len(rows)
    loader = loader_for(rows, method, params, train=True, seed=5, cache=slots)
    x, y, slot = next(iter(loader))
    tok = trunk.get(ids[slot.numpy()])
    assert tok.shape == (len(x), *method.net.trunk(x[:1]).shape[1:])
    for mode in (False, True):  # eval, and training mode (dropout 0: deterministic)
        method.train(mode)
        with torch.no_grad():
            full = method(x)
            cached = method(tok, from_trunk=True)
            # the only difference is the fp16 rounding of the tokens: exact on rounded uncached tokens
            rounded = method.net.classify(method.net.branch(method.net.trunk(x).half().float()))
        torch.testing.assert_close(cached[0], full[0], **TOL)
        torch.testing.assert_close(cached[1], full[1], **TOL)
        torch.testing.assert_close(cached[0], rounded[0], rtol=1e-6, atol=1e-6)
    # the training batches' dataset (as DataLoader workers get it: pickled, memory maps re-opened)
    import pickle

    from lorax.continual.trunk_cache import TokenSlotDataset

    ds = pickle.loads(pickle.dumps(TokenSlotDataset(trunk, ids, rows["class_id"].to_numpy())))
    t0, c0, s0 = ds[int(slot[0])]
    assert torch.equal(t0, tok[0]) and c0 == int(y[0]) and s0 == int(slot[0])
    # the newest adapter's step with old embeddings, as in training
    old = method.net.embeddings(x, ["a"])
    torch.testing.assert_close(method(tok, old, from_trunk=True)[0], method(x, old)[0], **TOL)


def test_hits_misses_and_content_addressing(zoo, tmp_path):
    root, manifests = zoo
    params = _params(tmp_path)
    method = _method(params)
    trunk = open_trunk_cache(method, params, CPU)
    rows = _train_rows(manifests)
    seeds = content_seeds(rows, 2)
    _, _, ids, computed = _fill_train(trunk, method, params, rows, seeds)
    assert computed == len(ids)
    # another process, same settings: every crop is a hit, nothing is computed
    again = open_trunk_cache(_method(params, ("x", "y", "z")), params, CPU)  # other adapters: same trunk
    assert again.dir == trunk.dir
    _, _, ids2, computed2 = _fill_train(again, method, params, rows, seeds)
    assert computed2 == 0 and np.array_equal(ids, ids2)
    # a changed image (another sha256) is a miss; so is another crop box
    changed = rows.copy()
    changed.loc[0, "sha256"] = "0" * 64
    base = dataset_for(rows, method, params, True, 0)
    assert not trunk.found(train_ids(base, changed.iloc[:1], seeds[:1])).any()
    assert trunk.found(train_ids(base, rows.iloc[:1], seeds[:1])).all()
    other_seeds = content_seeds(rows, 4)[:, 2:]  # crops 2, 3: other boxes / flips
    assert not trunk.found(train_ids(base, rows, other_seeds)).all()
    # eval crops are other views: misses until computed
    assert not trunk.found(eval_ids(rows, params.model.img_size, 1)).all()
    # a changed setting the tokens depend on is another folder: a miss
    for ov in ({"model__normalize": "imagenet"}, {"model__init_seed": 1}, {"adapter__last_k": 2}):
        p = _params(tmp_path, **ov)
        other = open_trunk_cache(_method(p), p, CPU)
        assert other.dir != trunk.dir and not other.found(ids).any(), ov
    # the precision the trunk runs in too (bf16 autocast on CUDA)
    from lorax.continual.trunk_cache import compute_tag, settings_key

    bb = method.net.backbone
    assert settings_key(method.net, 16, bb.info.mean, bb.info.std, compute_tag(torch.device("cuda"), True),
                        DEEP) != trunk.dir.name
    # ... but not whether the model ran yet (ConViT fills a non-persistent buffer at its first forward)
    ran = _method(params)
    with torch.no_grad():
        ran.net.embeddings(torch.zeros(1, 3, 16, 16))
    assert open_trunk_cache(ran, params, CPU).dir == trunk.dir
    p = _params(tmp_path, model__spectrum={"grid": 4, "sigma": 1.0})  # the spectrum rides in the trunk's rows
    assert open_trunk_cache(_method(p), p, CPU).dir != trunk.dir


def test_every_part_of_a_crop_changes_its_id():
    from lorax.continual.trunk_cache import view_ids

    base = (["ab" * 32], [(24, 24)], [(1, 2, 17, 18)], [False])
    changed = [(["ac" * 32], *base[1:]), (base[0], [(24, 25)], *base[2:]), (*base[:2], [(1, 3, 17, 19)], base[3]),
               (*base[:3], [True])]
    ids = {view_ids(*base).tobytes()} | {view_ids(*c).tobytes() for c in changed}
    assert len(ids) == 5
    assert view_ids(*base).tobytes() == view_ids(*base).tobytes()


def test_crops_are_deterministic_per_image_content(zoo, tmp_path):
    root, manifests = zoo
    params = _params(tmp_path)
    method = _method(params)
    rows = _train_rows(manifests)
    seeds = content_seeds(rows, 3)
    # the same image gets the same seeds wherever it sits (another task's rows, replayed exemplars, other order)
    shuffled = rows.sample(frac=1.0, random_state=0).reset_index(drop=True)
    again = content_seeds(shuffled, 3)
    for r, sha in enumerate(shuffled["sha256"]):
        assert torch.equal(again[r], seeds[int(np.flatnonzero(rows["sha256"] == sha)[0])])
    assert torch.equal(content_seeds(rows, 2), seeds[:, :2])  # crop k does not depend on K
    assert len(set(seeds.reshape(-1).tolist())) == seeds.numel()  # distinct crops per image and index
    # the ids (from the manifest's size) describe the crops the dataset really cuts: equal ids, equal pixels
    base = dataset_for(rows, method, params, True, 0)
    ids = train_ids(base, rows, seeds)
    ds = FrozenFeatureCache(len(rows), 3, 0, seeds).dataset(base)
    for r in range(len(rows)):
        crops = [ds[r * 3 + j][0] for j in range(3)]
        for a, b in ((0, 1), (0, 2), (1, 2)):
            assert np.array_equal(ids[r * 3 + a], ids[r * 3 + b]) == torch.equal(crops[a], crops[b])
    assert len({i.tobytes() for i in ids}) > len(rows) * 2  # the crops of an image mostly differ


def test_damaged_shard_is_a_miss(zoo, tmp_path):
    root, manifests = zoo
    params = _params(tmp_path)
    method = _method(params)
    trunk = open_trunk_cache(method, params, CPU)
    rows = _train_rows(manifests).iloc[:4].reset_index(drop=True)
    seeds = content_seeds(rows, 1)
    _, _, ids, _ = _fill_train(trunk, method, params, rows, seeds)
    (shard,) = trunk.dir.glob("*.safetensors")
    good = shard.read_bytes()
    for damage in (good[: len(good) // 2], good[:-3] + b"xyz", b"\x00" * 8 + good[8:], b""):
        shard.write_bytes(damage)
        fresh = TrunkCache(trunk.dir.parent, trunk.dir.name)
        assert not fresh.found(ids).any()
        # and filling again works: the crops are recomputed into a new shard
        _, _, _, computed = _fill_train(fresh, method, params, rows, seeds)
        assert computed == len(ids) and fresh.found(ids).all()
        for f in trunk.dir.glob("*.safetensors"):
            if f != shard:
                f.unlink()
    (trunk.dir / "stray.tmp").write_bytes(b"half written")  # an interrupted writer's file is ignored
    shard.write_bytes(good)
    assert TrunkCache(trunk.dir.parent, trunk.dir.name).found(ids).all()


def test_not_used_without_a_trunk_or_when_off(zoo, tmp_path):
    params = _params(tmp_path)
    assert wants_trunk_cache(_method(params), params)
    for ov in ({"adapter__blocks": "all"}, {"train__trunk_cache": False}, {"continual__method": "finetune"}):
        p = _params(tmp_path, **ov)
        method = build_method(p, ["a"])
        assert not wants_trunk_cache(method, p) and open_trunk_cache(method, p, CPU) is None, ov


def _run(manifests, params, out: Path):
    """Two tasks as `lorax train` runs them (train, select, evaluate): the accuracy matrix columns."""
    from lorax.continual.embedding_store import EmbeddingStore
    from tests.helpers import evaluate_task_list
    from lorax.continual.selection import select_exemplars
    from lorax.continual.trainer import train_task

    store = EmbeddingStore(out / "emb")
    memory, prev, cols = None, None, []
    for i, task in enumerate(["deconv", "nnconv"]):
        state = train_task(prev, manifests[task], memory, params, out / task,
                           history=[manifests[t] for t in ["deconv", "nnconv"][:i]])
        from lorax.continual.state import load_state

        method, _ = load_state(state, params=params)
        memory = select_exemplars(method, manifests[task], memory, params, store=store)
        result, _ = evaluate_task_list(method, [manifests[t] for t in ["deconv", "nnconv"][: i + 1]], params,
                                       store=store)
        cols.append(result["task_acc"])
        prev = state
    return cols, method, memory


def test_trunk_batches_equal_image_batches_of_the_same_crops(zoo, tmp_path, monkeypatch):
    """The batch source with the trunk cache yields what the image source yields for the same (content) crops:
    same targets, same old embeddings and logits up to the fp16 rounding of the tokens."""
    from lorax.continual import batches
    from lorax.continual.batches import BatchSource
    from lorax.continual.distributed import DistContext
    from lorax.continual.feature_cache import FrozenFeatureCache
    from lorax.continual.trunk_cache import content_seeds

    root, manifests = zoo
    on = _params(tmp_path, train__feature_cache=True)
    off = _params(tmp_path, train__feature_cache=True, train__trunk_cache=False)
    method = _method(on)
    rows = _train_rows(manifests)
    cached = BatchSource(rows, method, on, 7, CPU, DistContext())
    # the image source with the crops the trunk cache draws (from each image's content), not random ones
    monkeypatch.setattr(batches, "FrozenFeatureCache",
                        lambda n, k, seed, seeds=None: FrozenFeatureCache(n, k, seed, content_seeds(rows, k)))
    plain = BatchSource(rows, method, off, 7, CPU, DistContext())
    assert cached.tokens is not None and plain.tokens is None and len(cached) == len(plain)
    n = 0
    with torch.no_grad():
        for a, b in zip(cached.epoch(3), plain.epoch(3), strict=True):
            assert set(a.inputs) == {"x", "old_emb", "from_trunk"} and set(b.inputs) == {"x", "old_emb"}
            assert torch.equal(a.targets, b.targets) and (a.n_mine, a.weight) == (b.n_mine, b.weight)
            torch.testing.assert_close(a.inputs["old_emb"], b.inputs["old_emb"], **TOL)
            torch.testing.assert_close(method(**a.inputs)[0], method(**b.inputs)[0], **TOL)
            n += len(a.targets)
    assert n == len(rows)


def test_two_tasks_with_the_trunk_cache_reuse_every_crop(zoo, tmp_path):
    """A second stream over the same images computes no trunk token again and gives the same accuracy matrix."""
    root, manifests = zoo
    on = _params(tmp_path, train__epochs=2, train__feature_cache=True)
    trunk_dir = Path(on.train.trunk_cache_dir)
    cols_on, _, _ = _run(manifests, on, tmp_path / "on")
    shards = list(trunk_dir.rglob("*.safetensors"))
    assert shards  # the cache was really used (train crops and eval crops)
    cols_again, _, _ = _run(manifests, on, tmp_path / "again")
    assert cols_again == cols_on
    assert sorted(trunk_dir.rglob("*.safetensors")) == sorted(shards)


def test_eval_embeddings_from_the_cache_equal_uncached(zoo, tmp_path):
    from lorax.continual.embedding_store import EmbeddingStore
    from lorax.continual.evaluation import predict_logits

    root, manifests = zoo
    params = _params(tmp_path, eval__crops=2)
    method = _method(params)
    val = manifests["deconv"][manifests["deconv"]["split"] == "val"].reset_index(drop=True)
    params_off = params.model_copy(deep=True)
    params_off.train.trunk_cache = False
    want, wf = predict_logits(method, val, params_off, CPU, features=True, store=EmbeddingStore(tmp_path / "e0"))
    got, gf = predict_logits(method, val, params, CPU, features=True, store=EmbeddingStore(tmp_path / "e1"))
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(gf, wf, **TOL)
    trunk = open_trunk_cache(method, params, CPU)
    assert trunk.found(eval_ids(val, params.model.img_size, 2)).all()
    # embeddings from fp16 tokens are stored apart from exact ones: a run's results never depend on which ran first
    from lorax.continual.evaluation import adapter_keys

    assert set(adapter_keys(method, params)).isdisjoint(adapter_keys(method, params_off))
    # a changed file is refused even when every crop is cached (the rows are not decoded)
    from lorax.data.manifest import ManifestError, abs_paths

    first, second = abs_paths(val)[:2]
    keep = Path(first).read_bytes()
    shutil.copy(second, first)
    try:
        with pytest.raises(ManifestError):
            predict_logits(method, val, params, CPU, store=EmbeddingStore(tmp_path / "e2"))
    finally:
        Path(first).write_bytes(keep)


def test_trunk_cache_without_the_feature_cache_and_an_unwritable_folder(zoo, tmp_path):
    """Old adapters then run from the cached tokens every step; a cache folder that cannot be written is one line."""
    from lorax.continual.state import read_info
    from lorax.continual.trainer import train_task

    root, manifests = zoo
    p = _params(tmp_path, train__feature_cache=False)
    s0 = train_task(None, manifests["deconv"], None, p, tmp_path / "s0")
    s1 = train_task(s0, manifests["nnconv"], None, p, tmp_path / "s1")
    assert read_info(s1)["tasks"] == ["deconv", "nnconv"]
    assert all(np.isfinite(r["loss"]) for r in read_info(s1)["epochs"])
    assert len(list(Path(p.train.trunk_cache_dir).rglob("*.safetensors"))) == 2  # one shard per task's new rows
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    bad = _params(tmp_path, train__trunk_cache_dir=str(blocked))
    with pytest.raises(ValueError, match=r"^train.trunk_cache_dir: cannot write .*a-file") as e:
        train_task(None, manifests["deconv"], None, bad, tmp_path / "s2")
    assert "\n" not in str(e.value)
