"""Frozen-feature cache: cached logits equal the uncached forward on the same crops; crops fixed per task; training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from lorax.continual.feature_cache import FrozenFeatureCache, wants_feature_cache
from lorax.continual.methods import build_method
from lorax.continual.batches import dataset_for, loader_for
from tests.helpers import tiny_params


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The tiny two-task zoo, prepared (12 train images per class and task)."""
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    root = tmp_path_factory.mktemp("fcache")
    params = tiny_params(root, adapter__dropout=0.0)
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    return params, load_stream_manifests(params.data.manifests, params.tasks)


def _method(params, tasks=("a", "b", "c")):
    torch.manual_seed(0)
    method = build_method(params, list(tasks))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in tasks:
            for p in method.net.adapters.parameters(t):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return method


def _rows(manifests: dict[str, pd.DataFrame]) -> pd.DataFrame:
    df = manifests["deconv"]
    return df[df["split"] == "train"].reset_index(drop=True)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cached_logits_equal_uncached_on_the_same_crops(zoo, mode):
    params, manifests = zoo
    method = _method(params)
    rows = _rows(manifests)
    cache = FrozenFeatureCache(len(rows), crops=3, seed=7)
    cache.build(method.net, dataset_for(rows, method, params, True, 0), 16, torch.device("cpu"),
                torch.autocast("cpu", enabled=False))
    assert cache.emb.shape == (len(rows) * 3, 2, method.net.embed_dim)
    loader = loader_for(rows, method, params, train=True, seed=5, cache=cache)
    method.train(mode == "train")
    x, y, slots = next(iter(loader))
    with torch.no_grad():
        cached = method(x, cache.lookup(slots, torch.device("cpu")))
        full = method(x)
    torch.testing.assert_close(cached[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[1], full[1], rtol=1e-5, atol=1e-5)
    # and the cached embeddings really are the old adapters' (not trivially equal: adapters differ)
    emb = cache.lookup(slots, torch.device("cpu"))
    assert (emb[0] - emb[1]).abs().max() > 1e-3


def test_crops_are_fixed_per_task_and_every_row_is_seen_each_epoch(zoo):
    params, manifests = zoo
    method = _method(params, ("a", "b"))
    rows = _rows(manifests)
    k = 2
    cache = FrozenFeatureCache(len(rows), crops=k, seed=3)
    base = dataset_for(rows, method, params, True, 0)
    ds = cache.dataset(base)
    fixed = {s: ds[s][0] for s in range(cache.n_slots)}
    picks = []
    for epoch_seed in (11, 12, 13):
        loader = loader_for(rows, method, params, train=True, seed=epoch_seed, cache=cache)
        slots = []
        for x, _, s in loader:
            for img, slot in zip(x, s.tolist(), strict=True):
                assert torch.equal(img, fixed[slot])  # every crop is one of the task's fixed crops
            slots += s.tolist()
        assert sorted(sl // k for sl in slots) == list(range(len(rows)))  # each row once per epoch
        picks.append(slots)
    assert picks[0] != picks[1]  # order and crop choice change with the epoch
    again = [s for _, _, b in loader_for(rows, method, params, train=True, seed=11, cache=cache) for s in b.tolist()]
    assert again == picks[0]  # and are reproducible
    # the crops differ between the K slots of a row (random boxes / flips)
    assert any(not torch.equal(fixed[r * k], fixed[r * k + 1]) for r in range(len(rows)))


def test_cache_needs_a_frozen_adapter_and_lorax(zoo):
    params, manifests = zoo
    on = params.model_copy(deep=True)
    on.train.feature_cache = True
    assert not wants_feature_cache(_method(on, ("a",)), on)  # first task: nothing frozen
    assert wants_feature_cache(_method(on, ("a", "b")), on)
    off = params.model_copy(deep=True)
    off.train.feature_cache = False
    assert not wants_feature_cache(_method(off, ("a", "b")), off)  # setting off
    ft = on.model_copy(deep=True)
    ft.continual.method = "finetune"
    assert not wants_feature_cache(build_method(ft, ["a", "b"]), ft)
    cache = FrozenFeatureCache(4, crops=1, seed=0)
    with pytest.raises(ValueError, match="at least one frozen adapter"):
        cache.build(_method(params, ("a",)).net, None, 4, torch.device("cpu"), torch.autocast("cpu", enabled=False))


def test_train_task_with_the_cache(zoo, tmp_path: Path):
    """Two tasks with train.feature_cache on: the second trains on cached old embeddings and saves a state."""
    from lorax.continual.state import read_info
    from lorax.continual.trainer import train_task

    params, manifests = zoo
    p = params.model_copy(deep=True)
    p.train.feature_cache = True
    p.train.epochs = 2
    s0 = train_task(None, manifests["deconv"], None, p, tmp_path / "s0")
    s1 = train_task(s0, manifests["nnconv"], None, p, tmp_path / "s1")
    info = read_info(s1)
    assert info["tasks"] == ["deconv", "nnconv"]
    assert len(info["epochs"]) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in info["epochs"])
