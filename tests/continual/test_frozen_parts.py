"""LoRAX's frozen parts (the trunk, each old adapter) and the probe's frozen backbone through the feature store:
stored parts compose to the plain forward, a view goes through a frozen part once, a change is a miss, and rows
read wholly from the store still have their files checked."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lorax.continual.batches import dataset_for
from lorax.continual.evaluation import frozen_features, predict_logits, val_rows
from lorax.continual.frozen_parts import (
    adapter_embeddings,
    adapter_producer,
    crop_mean,
    features_producer,
    trunk_producer,
    trunk_tokens,
)
from lorax.continual.methods import Frozen, build_method
from lorax.continual.state import load_state
from lorax.continual.trainer import train_task
from lorax.data.manifest import ManifestError
from lorax.features.store import FeatureStore
from lorax.features.views import eval_views, train_views
from tests.helpers import prepared_zoo, store_params, tiny_params

CPU = torch.device("cpu")
# depth 3, adapters in the last block only: blocks 0-1 are the frozen trunk (the ConViT class token joins at 1)
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 stored values: only the batching of the passes differs
FIRST, SECOND = "deconv", "nnconv"


def _params(root: Path, **ov):
    return store_params(root, **ov)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The tiny two-task zoo, prepared (12 train and 6 val images per class and task)."""
    root = tmp_path_factory.mktemp("frozen")
    return root, prepared_zoo(root, _params(root))


@pytest.fixture(scope="module")
def stream(zoo, tmp_path_factory):
    """LoRAX (the default settings, shrunk) trained on the two tasks: the states after each."""
    _, manifests = zoo
    root = tmp_path_factory.mktemp("frozen-stream")
    params = tiny_params(root, cache__dir=str(root / "cache"))
    s0 = train_task(None, manifests[FIRST], None, params, root / "s0")
    s1 = train_task(s0, manifests[SECOND], None, params, root / "s1")
    return params, manifests, s0, s1


def _method(params, tasks=("a", "b")):
    torch.manual_seed(0)
    method = build_method(params, list(tasks))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in tasks:
            for p in method.net.adapters.parameters(t):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return method.eval()


def _rows(manifests, task=FIRST, split="train") -> pd.DataFrame:
    df = manifests[task]
    return df[df["split"] == split].reset_index(drop=True)


class _Count:
    """Counts what LoRAX's frozen parts compute: images through the trunk, views through each adapter group."""

    def __init__(self, net) -> None:
        self.trunk, self.branch = 0, Counter()
        trunk, branch = net.trunk, net.branch

        def counted_trunk(x):
            self.trunk += len(x)
            return trunk(x)

        def counted_branch(tok, names=None, one_pass=None):
            self.branch[tuple(names) if names is not None else ("*",)] += len(tok)
            return branch(tok, names, one_pass)

        net.trunk, net.branch = counted_trunk, counted_branch

    def clear(self) -> None:
        self.trunk, self.branch = 0, Counter()


# feature levels below the branch and the residual spectrum travel with the stored tokens; with adapter.blocks all
# the trunk is just the stem (the early-block adapter goes through the same store, with the same code)
@pytest.mark.parametrize("blocks,levels,spectrum", [
    ("last_k", [], None), ("last_k", [1, 3], None), ("last_k", [1], {"grid": 4, "sigma": 1.0}),
    ("all", [], None), ("all", [2], {"grid": 4, "sigma": 1.0})])
def test_stored_trunk_and_old_embeddings_compose_to_the_plain_forward(zoo, tmp_path, blocks, levels, spectrum):
    _, manifests = zoo
    params = _params(tmp_path, adapter__blocks=blocks, model__feature_levels=levels, model__spectrum=spectrum)
    method = _method(params)
    net = method.net
    assert net.branch_block == (2 if blocks == "last_k" else 0)
    rows = _rows(manifests)
    base = dataset_for(rows, method, params, True, 0)
    views = train_views(rows, base, 2)
    store = FeatureStore(tmp_path / "features")
    tok = trunk_tokens(method, params, store, base, rows, views, CPU)
    old = adapter_embeddings(method, params, store, base, rows, views, ["a"], CPU)
    assert old.shape == (len(views.ids), 1, net.embed_dim)
    slots = np.arange(0, len(views.ids), 5)
    x = torch.stack([base[(s // 2, int(views.seeds[s // 2, s % 2]))][0] for s in slots])
    with torch.no_grad():
        torch.testing.assert_close(tok[slots], net.trunk(x), **TOL)
        if blocks == "all" and not levels and not spectrum:
            torch.testing.assert_close(tok[slots], net.backbone.stem(x), **TOL)  # the trunk is the stem
        both = net.embeddings(x)
        torch.testing.assert_close(old[slots, 0], both[0], **TOL)
        assert (both[0] - both[1]).abs().max() > 1e-3  # the adapters differ: the old embedding is really a's
        for mode in (False, True):  # eval, and training mode (dropout 0: deterministic)
            method.train(mode)
            full = method(x)
            stored = method(Frozen(tok[slots], old[slots].permute(1, 0, 2)))
            torch.testing.assert_close(stored[0], full[0], **TOL)
            torch.testing.assert_close(stored[1], full[1], **TOL)
    first = method.tasks[:1]
    single = _method(params, first)  # the first task: no old embeddings, the newest adapter on the tokens
    with torch.no_grad():
        torch.testing.assert_close(single(Frozen(tok[slots]))[0], single(x)[0], **TOL)


def test_producers_change_with_what_their_output_depends_on(zoo, tmp_path):
    params = _params(tmp_path)
    method = _method(params)
    trunk, _ = trunk_producer(method, params, CPU)
    # other adapters on the same trunk: the same trunk producer
    assert trunk_producer(_method(params, ("x", "y", "z")), params, CPU)[0] == trunk
    for ov in ({"model__normalize": "imagenet"}, {"model__init_seed": 1}, {"adapter__last_k": 2},
               {"adapter__blocks": "all"}, {"model__spectrum": {"grid": 4, "sigma": 1.0}},
               {"model__feature_levels": [1]}, {"model__img_size": 20}):
        p = _params(tmp_path, **ov)
        assert trunk_producer(_method(p), p, CPU)[0] != trunk, ov
    assert trunk_producer(method, params, torch.device("cuda"))[0] != trunk  # fp32 here, bf16 autocast there
    off = _params(tmp_path, train__amp=False)
    assert trunk_producer(method, off, torch.device("cuda"))[0] != trunk_producer(method, params,
                                                                                   torch.device("cuda"))[0]
    # ... but not whether the model ran yet (ConViT fills a non-persistent buffer at its first forward)
    ran = _method(params)
    with torch.no_grad():
        ran.net.embeddings(torch.zeros(1, 3, 16, 16))
    assert trunk_producer(ran, params, CPU)[0] == trunk
    # an adapter's producer: its tensors, its task, the trunk under it
    a = adapter_producer(method, params, CPU, "a")[0]
    assert a != adapter_producer(method, params, CPU, "b")[0]
    assert a == adapter_producer(_method(params), params, CPU, "a")[0]
    with torch.no_grad():
        method.net.adapters.parameters("a")[1].add_(1e-3)
    assert adapter_producer(method, params, CPU, "a")[0] != a
    p = _params(tmp_path, model__normalize="imagenet")
    assert adapter_producer(_method(p), p, CPU, "a")[0] != a
    # the frozen base weights under the adapters (a checkpoint that differs only there) are part of it too
    other = _method(params)
    a = adapter_producer(other, params, CPU, "a")[0]
    bb = other.net.backbone
    base = next(t for n, t in bb.model.state_dict(keep_vars=True).items()
                if n.startswith(bb.block_prefix(other.net.branch_block)) and ".lora_" not in n and t.is_floating_point())
    with torch.no_grad():
        base.add_(1e-3)
    bb.__dict__.pop("_lorax_branch_hash")  # hashed once per backbone (it is frozen); a new load hashes it again
    assert adapter_producer(other, params, CPU, "a")[0] != a
    assert trunk_producer(other, params, CPU)[0] == trunk  # below the branch nothing changed
    probe = _params(tmp_path, continual__method="probe")
    pm = build_method(probe, ["a"])
    assert features_producer(pm, probe, CPU)[0] not in (trunk, a)


def test_a_second_evaluation_computes_nothing_and_equals_the_plain_forward(zoo, tmp_path):
    _, manifests = zoo
    params = _params(tmp_path, eval__crops=2)
    method = _method(params)
    val = _rows(manifests, split="val")
    store = FeatureStore(tmp_path / "features")
    count = _Count(method.net)
    logits, feats = predict_logits(method, val, params, CPU, features=True, store=store)
    assert count.trunk == 2 * len(val) and count.branch == {("a", "b"): 2 * len(val)}
    # the plain forward on the same crops (logits averaged over them; the head is linear)
    ds = dataset_for(val, method, params, False, 0, 2)
    x = torch.cat([ds[i][0] for i in range(len(val))])
    with torch.no_grad():
        ref = crop_mean(method(x)[0], 2).numpy()
        ref_feats = crop_mean(method.features(x), 2).numpy()
    np.testing.assert_allclose(logits, ref, **TOL)
    np.testing.assert_allclose(feats, ref_feats, **TOL)
    shards = sorted(store.root.rglob("*.safetensors"))
    count.clear()
    again, again_feats = predict_logits(method, val, params, CPU, features=True,
                                        store=FeatureStore(tmp_path / "features"))  # another process, later
    assert count.trunk == 0 and not count.branch
    assert np.array_equal(again, logits) and np.array_equal(again_feats, feats)
    assert sorted(store.root.rglob("*.safetensors")) == shards


def test_after_a_new_task_only_the_new_adapter_runs_on_old_images(stream, tmp_path):
    params, manifests, s0, s1 = stream
    store = FeatureStore(tmp_path / "features")
    val = val_rows([manifests[FIRST], manifests[SECOND]])
    old = val[val["task"] == FIRST]
    m0, _ = load_state(s0, params=params)
    count0 = _Count(m0.net)
    predict_logits(m0, old, params, CPU, features=True, store=store)
    assert count0.trunk == len(old) and count0.branch == {(FIRST,): len(old)}

    m1, _ = load_state(s1, params=params)
    count1 = _Count(m1.net)
    logits, feats = predict_logits(m1, val, params, CPU, features=True, store=store)
    # the old images: stored trunk tokens, only the new adapter run; the new images through both adapters
    assert count1.trunk == len(val) - len(old)
    assert count1.branch == {(SECOND,): len(old), (FIRST, SECOND): len(val) - len(old)}
    ref, ref_feats = predict_logits(m1, val, params, CPU, features=True, store=FeatureStore(None))  # from scratch
    np.testing.assert_allclose(logits, ref, **TOL)
    np.testing.assert_allclose(feats, ref_feats, **TOL)


def _copy_rows(rows: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The rows with their files copied under ``root`` (so a test may change them)."""
    out = rows.copy()
    for i in out.index:
        dst = root / out.loc[i, "path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(out.loc[i, "root"]) / out.loc[i, "path"], dst)
    out["root"] = str(root)
    return out


def _change_on_disk(path: Path) -> str:
    """One pixel of the image changed (same size and mode, other content); returns the new file's sha256."""
    a = np.asarray(Image.open(path).convert("RGB")).copy()
    a[0, 0] ^= 255
    Image.fromarray(a).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_retrained_adapter_or_changed_image_is_a_miss(stream, tmp_path):
    params, manifests, s0, _ = stream
    store = FeatureStore(tmp_path / "features")
    rows = _copy_rows(_rows(manifests, split="val").head(4), tmp_path / "data")
    m0, _ = load_state(s0, params=params)
    count = _Count(m0.net)
    predict_logits(m0, rows, params, CPU, store=store)
    assert count.trunk == 4
    with torch.no_grad():  # the same task retrained: other adapter tensors, another producer
        m0.net.adapters.parameters(FIRST)[1].add_(0.5)
    count.clear()
    predict_logits(m0, rows, params, CPU, store=store)
    assert count.trunk == 0 and count.branch == {(FIRST,): 4}  # the trunk's tokens are still good
    # one image changed and re-prepared (a new sha256): only that one is computed again
    first = Path(rows["root"].iloc[0]) / rows["path"].iloc[0]
    edited = rows.copy()
    edited.loc[edited.index[0], "sha256"] = _change_on_disk(first)
    count.clear()
    predict_logits(m0, edited, params, CPU, store=store)
    assert count.trunk == 1 and count.branch == {(FIRST,): 1}


def test_rows_read_wholly_from_the_store_still_have_their_files_checked(stream, tmp_path):
    params, manifests, s0, _ = stream
    store = FeatureStore(tmp_path / "features")
    rows = _copy_rows(_rows(manifests, split="val").head(4), tmp_path / "data")
    m0, _ = load_state(s0, params=params)
    first, _ = predict_logits(m0, rows, params, CPU, store=store)
    count = _Count(m0.net)
    again, _ = predict_logits(m0, rows, params, CPU, store=store)  # every view stored: no row decoded
    assert count.trunk == 0 and not count.branch and np.array_equal(again, first)
    path = rows["path"].iloc[2]
    _change_on_disk(Path(rows["root"].iloc[2]) / path)
    with pytest.raises(ManifestError, match="changed since the manifest was written") as e:
        predict_logits(m0, rows, params, CPU, store=store)
    assert path in str(e.value)
    # the training views' trunk tokens too: a row none of whose views is decoded is checked all the same
    train = _copy_rows(_rows(manifests).head(4), tmp_path / "train-data")
    base = dataset_for(train, m0, params, True, 0)
    views = train_views(train, base, 2)
    trunk_tokens(m0, params, store, base, train, views, CPU)
    _change_on_disk(Path(train["root"].iloc[1]) / train["path"].iloc[1])
    with pytest.raises(ManifestError, match="changed since the manifest was written"):
        trunk_tokens(m0, params, store, dataset_for(train, m0, params, True, 0), train, views, CPU)


def test_probe_keeps_its_frozen_features_once(zoo, tmp_path):
    """The probe (frozen backbone): its eval-view features go to the store once (the refit head and the evaluation
    read them back, the same logits as the plain forward), and ``train.epochs: 0`` leaves the head to the refit."""
    _, manifests = zoo
    p = tiny_params(tmp_path, continual__method="probe", continual__head="refit", train__epochs=0, eval__crops=2,
                    cache__dir=str(tmp_path / "cache"))
    store = FeatureStore(tmp_path / "features")
    state = train_task(None, manifests[FIRST], None, p, tmp_path / "probe", store=store)
    method, info = load_state(state, params=p)
    assert frozen_features(method) and info["epochs"] == [] and info["head"]["kind"] == "refit"
    val = _rows(manifests, split="val")
    ds = dataset_for(val, method, p, False, 0, 2)
    with torch.no_grad():
        plain = crop_mean(method(torch.cat([ds[i][0] for i in range(len(val))]))[0], 2).numpy()
    calls = []
    real = method.features
    method.features = lambda x: calls.append(len(x)) or real(x)
    first, f1 = predict_logits(method, val, p, CPU, store=store, features=True)
    assert sum(calls) == 2 * len(val)
    again, f2 = predict_logits(method, val, p, CPU, store=FeatureStore(tmp_path / "features"), features=True)
    assert sum(calls) == 2 * len(val)  # the second evaluation computed nothing
    np.testing.assert_allclose(first, plain, **TOL)
    assert np.array_equal(again, first) and np.array_equal(f2, f1)
    # the refit head read the train rows' features from the same store: no train row computed again
    train = _rows(manifests)
    calls.clear()
    fit, _ = predict_logits(method, train, p, CPU, store=store)
    assert calls == []
    assert (fit.argmax(1) == train["class_id"].to_numpy()).mean() == 1.0  # the refit head, not left at its init
    key = features_producer(method, p, CPU)[0]
    assert store.found(key, eval_views(train, p.model.img_size, 2).ids).all()


def test_rows_whose_trunk_tokens_are_stored_are_checked_when_an_adapter_runs_on_them(stream, tmp_path):
    """After a new task (or a retrained adapter), old images go through the new adapter from their stored trunk
    tokens, without being decoded: their files are checked all the same."""
    params, manifests, s0, _ = stream
    store = FeatureStore(tmp_path / "features")
    rows = _copy_rows(_rows(manifests, split="val").head(4), tmp_path / "data")
    m0, _ = load_state(s0, params=params)
    predict_logits(m0, rows, params, CPU, store=store)
    with torch.no_grad():  # another adapter: its embeddings are missing, the trunk's tokens are stored
        m0.net.adapters.parameters(FIRST)[1].add_(0.5)
    path = rows["path"].iloc[1]
    _change_on_disk(Path(rows["root"].iloc[1]) / path)
    count = _Count(m0.net)
    with pytest.raises(ManifestError, match="changed since the manifest was written") as e:
        predict_logits(m0, rows, params, CPU, store=store)
    assert path in str(e.value) and count.trunk == 0


def test_ranks_split_the_missing_trunk_tokens_whatever_each_saw(zoo, tmp_path):
    """DDP with a store on disk: each rank computes its share of the missing views, then every rank reads them all.
    The shares must cover every view even when one rank wrote before another looked (its missing set is smaller)."""
    _, manifests = zoo
    params = _params(tmp_path)
    method = _method(params)
    rows = _rows(manifests)
    base = dataset_for(rows, method, params, True, 0)
    views = train_views(rows, base, 2)
    key = trunk_producer(method, params, CPU)[0]
    ranks = [FeatureStore(tmp_path / "features") for _ in range(2)]
    ranks[0].found(key, views.ids[:1])  # rank 0 looked before anything was written
    count = _Count(method.net)
    trunk_tokens(method, params, ranks[0], base, rows, views, CPU, rank=0, world=2, read=False)
    trunk_tokens(method, params, ranks[1], base, rows, views, CPU, rank=1, world=2, read=False)  # looks later
    for store in ranks:  # after the barrier
        store.refresh(key)
        assert store.found(key, views.ids).all()
    assert count.trunk <= len(views.ids)  # and none computed twice
    torch.testing.assert_close(ranks[1].get(key, views.ids), trunk_tokens(method, params, FeatureStore(None), base,
                                                                          rows, views, CPU), **TOL)
