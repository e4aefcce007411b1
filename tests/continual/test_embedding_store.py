"""The store of frozen adapters' embeddings: same numbers as a full pass, and only missing pairs computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lorax.continual.embedding_store import EmbeddingStore, image_ids
from lorax.continual.evaluation import predict_logits, val_rows
from lorax.continual.state import load_state
from lorax.continual.trainer import train_task
from tests.helpers import tiny_params

FIRST, SECOND = "deconv", "nnconv"


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """The tiny two-task zoo, prepared, and the LoRAX states after each task."""
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    root = tmp_path_factory.mktemp("embstore")
    params = tiny_params(root)
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    manifests = load_stream_manifests(params.data.manifests, params.tasks)
    s0 = train_task(None, manifests[FIRST], None, params, root / "s0")
    s1 = train_task(s0, manifests[SECOND], None, params, root / "s1")
    return params, manifests, s0, s1


class _Counting:
    """Records which adapters every ``net.embeddings`` call computes, and for how many images."""

    def __init__(self, net) -> None:
        self.calls: list[tuple[tuple[str, ...], int]] = []
        self._orig = net.embeddings
        net.embeddings = self

    def __call__(self, x, names=None, one_pass=None):
        self.calls.append((tuple(names), x.shape[0]))
        return self._orig(x, names, one_pass)


def test_store_matches_a_full_pass_and_computes_only_the_new_adapter(stream, tmp_path) -> None:
    params, manifests, s0, s1 = stream
    store = EmbeddingStore(tmp_path / "emb")
    val = val_rows([manifests[FIRST], manifests[SECOND]])
    old = val[val["task"] == FIRST]

    m0, _ = load_state(s0, params=params)
    count0 = _Counting(m0.net)
    predict_logits(m0, old, params, features=True, store=store)
    assert count0.calls == [((FIRST,), len(old))]

    m1, _ = load_state(s1, params=params)
    ref_logits, ref_feats = predict_logits(m1, val, params, features=True)  # no store: the reference
    count1 = _Counting(m1.net)
    logits, feats = predict_logits(m1, val, params, features=True, store=EmbeddingStore(tmp_path / "emb"))
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats, ref_feats, rtol=1e-4, atol=1e-5)
    # the first task's images only through the new adapter; the new task's images through both
    assert sorted(count1.calls) == sorted([((SECOND,), len(old)), ((FIRST, SECOND), len(val) - len(old))])

    count1.calls.clear()
    again, _ = predict_logits(m1, val, params, features=True, store=EmbeddingStore(tmp_path / "emb"))
    assert count1.calls == [] and np.array_equal(again, logits)


def test_retrained_adapter_or_changed_image_is_a_miss(stream, tmp_path) -> None:
    params, manifests, s0, _ = stream
    store = EmbeddingStore(tmp_path / "emb")
    rows = manifests[FIRST][manifests[FIRST]["split"] == "val"].head(4)
    m0, _ = load_state(s0, params=params)
    predict_logits(m0, rows, params, store=store)
    with torch.no_grad():  # the same task retrained: other adapter tensors, another key
        m0.net.adapters.parameters(FIRST)[1].add_(0.5)
    count = _Counting(m0.net)
    predict_logits(m0, rows, params, store=store)
    assert count.calls == [((FIRST,), len(rows))]
    # one image changed (and re-prepared: a new file and its hash; the store keys images by their file's sha256)
    import hashlib

    from PIL import Image

    first = Path(rows["root"].iloc[0]) / rows["path"].iloc[0]
    changed = np.asarray(Image.open(first).convert("RGB")).copy()
    changed[0, 0] ^= 255
    Image.fromarray(changed).save(tmp_path / "changed.png")
    edited = rows.copy()
    edited.loc[edited.index[0], ["root", "path", "sha256"]] = [
        str(tmp_path), "changed.png", hashlib.sha256((tmp_path / "changed.png").read_bytes()).hexdigest()]
    count.calls.clear()
    predict_logits(m0, edited, params, store=store)
    assert count.calls == [((FIRST,), 1)]


def test_damaged_shard_is_a_miss_not_an_error(tmp_path) -> None:
    store = EmbeddingStore(tmp_path)
    ids = image_ids(pd.DataFrame({"sha256": ["ab" * 32, "cd" * 32]}))
    store.add("k", ids, np.ones((2, 3), np.float32))
    found, emb = EmbeddingStore(tmp_path).lookup("k", ids)
    assert found.all() and emb.shape == (2, 3) and (emb == 1).all()
    shard = next((tmp_path / "k").glob("*.safetensors"))
    shard.write_bytes(b"not a safetensors file")
    found, emb = EmbeddingStore(tmp_path).lookup("k", ids)
    assert not found.any() and emb is None


def test_run_stream_uses_the_store_and_matches_a_run_without_it(stream, tmp_path) -> None:
    """``lorax train`` (run_stream) keeps its store under --out; its accuracy matrix is that of a store-less run."""
    from pipelines.train_stream import run_stream

    params, *_ = stream
    with_store = run_stream(params, params.data.manifests, tmp_path / "with")
    shards = list((tmp_path / "with" / params.eval.embedding_cache_dir).rglob("*.safetensors"))
    assert shards, "run_stream wrote nothing to its embedding store"
    off = params.model_copy(update={"eval": params.eval.model_copy(update={"embedding_cache": False})})
    without = run_stream(off, params.data.manifests, tmp_path / "without")
    assert not (tmp_path / "without" / params.eval.embedding_cache_dir).exists()
    np.testing.assert_allclose(np.array(with_store["acc_matrix"], dtype=float),
                               np.array(without["acc_matrix"], dtype=float), atol=1e-6)


def test_probe_keeps_its_frozen_features_once_and_trains_no_epoch(stream, tmp_path) -> None:
    """The probe (frozen backbone): its eval-view features go to the store once (the refit head and the evaluation
    read them back, same logits as a full pass), and ``train.epochs: 0`` leaves the head to the closed-form refit."""
    from lorax.continual.evaluation import frozen_features

    _, manifests, _, _ = stream
    p = tiny_params(tmp_path, continual__method="probe", continual__head="refit", train__epochs=0)
    state = train_task(None, manifests[FIRST], None, p, tmp_path / "probe")
    method, info = load_state(state, params=p)
    assert frozen_features(method) and info["epochs"] == [] and info["head"]["kind"] == "refit"
    store = EmbeddingStore(tmp_path / "emb")
    val = val_rows([manifests[FIRST]])
    plain, _ = predict_logits(method, val, p)
    calls = []
    real = method.features
    method.features = lambda x: calls.append(len(x)) or real(x)
    first, f1 = predict_logits(method, val, p, store=store, features=True)
    n_first = sum(calls)
    again, f2 = predict_logits(method, val, p, store=store, features=True)
    assert n_first == len(val) * p.eval.crops and sum(calls) == n_first  # the second call computed nothing
    np.testing.assert_allclose(first, plain, atol=1e-5)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(f2, f1)
    train = manifests[FIRST][manifests[FIRST]["split"] == "train"]
    fit, _ = predict_logits(method, train, p, store=store)
    assert (fit.argmax(1) == train["class_id"].to_numpy()).mean() == 1.0  # the refit head, not left at its init
