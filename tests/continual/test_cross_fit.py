"""Cross-fitted heads (``continual.cross_fit``; lorax/continual/cross_fit.py): the head refit, the verdict and the
prediction sets of a task are fitted on out-of-fold newest-task features, and the saved model is unchanged.

One tiny 2-task LoRAX stream with the refit head is trained with ``cross_fit: 0`` (run_stream); its second task is
then trained again from the same previous state and memory with ``cross_fit: 3``, with the fits' inputs recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lorax.config import ConfigError
from tests.helpers import prepared_zoo, tiny_params

K = 3


@pytest.fixture(scope="module")
def crossfit(tmp_path_factory):
    from _pytest.monkeypatch import MonkeyPatch

    import lorax.continual.head as head_mod
    import lorax.continual.trainer as trainer_mod
    import lorax.continual.verdict as verdict_mod
    from lorax.continual.memory import ExemplarMemory
    from lorax.continual.trainer import train_task
    from pipelines.layout import Layout
    from pipelines.train_stream import run_stream

    root = tmp_path_factory.mktemp("cross_fit")
    off = tiny_params(root, continual__head="refit")
    manifests = prepared_zoo(root, off)
    run_stream(off, off.data.manifests, root / "off")
    layout = Layout.run(off, root / "off", off.data.manifests)
    first, second = off.tasks
    memory = ExemplarMemory.load(layout.memory(first), layout.data_root)

    seen: dict = {"sources": [], "fits": {}}
    mp = MonkeyPatch()

    def spy(module, name, record):
        real = getattr(module, name)

        def wrapper(*a, **kw):
            out = real(*a, **kw)
            record(a, kw, out)
            return out
        mp.setattr(module, name, wrapper)

    spy(trainer_mod, "BatchSource", lambda a, kw, out: seen["sources"].append(a[0].copy()))
    spy(trainer_mod, "cross_fit_features", lambda a, kw, out: seen.__setitem__("cross", out))
    spy(trainer_mod, "fit_heads", lambda a, kw, out: seen.__setitem__("rows", a[1].copy()))
    spy(head_mod, "refit_class_head", lambda a, kw, out: seen["fits"].__setitem__("head", np.array(a[3])))
    spy(verdict_mod, "fit_verdict", lambda a, kw, out: seen["fits"].__setitem__("verdict", np.array(a[0])))
    spy(head_mod, "fit_sets", lambda a, kw, out: seen["fits"].__setitem__("sets", np.array(a[0])))
    on = tiny_params(root, continual__head="refit", continual__cross_fit=K)
    try:
        state = train_task(layout.state(first), manifests[second], memory, on, root / "on" / second)
    finally:
        mp.undo()
    return {"off": off, "on": on, "state": state, "state_off": layout.state(second), "root": root,
            "manifests": manifests, **seen}


def _features(state: Path, rows: pd.DataFrame, params, newest: dict | None = None) -> np.ndarray:
    """Super-features of ``rows`` by the model in ``state`` (its newest producer replaced by ``newest``), computed
    afresh in an in-memory feature store."""
    from lorax.continual.evaluation import predict_logits
    from lorax.continual.state import load_state

    method, _ = load_state(state, params=params)
    if newest is not None:
        groups = method.tensor_groups()
        groups.update(newest)
        method.load_tensor_groups(groups)
    fresh = params.model_copy(deep=True)
    fresh.cache.enabled = False
    _, feats = predict_logits(method, rows.reset_index(drop=True), fresh, torch.device("cpu"), features=True)
    return feats


def test_head_verdict_and_sets_are_fitted_on_out_of_fold_features(crossfit):
    cross, rows, fits = crossfit["cross"], crossfit["rows"], crossfit["fits"]
    assert set(fits) == {"head", "verdict", "sets"}
    used = fits["head"]
    for name in ("verdict", "sets"):
        np.testing.assert_array_equal(fits[name], used)
    insample = _features(crossfit["state"], rows, crossfit["on"])
    w = cross.newest.shape[1]
    assert used.shape == insample.shape and w == insample.shape[1] // 2
    # the old slice is the frozen first adapter's, as is; the newest slice is the out-of-fold one, not the in-sample
    np.testing.assert_allclose(used[:, :-w], insample[:, :-w], rtol=0, atol=1e-6)
    assert (np.abs(used[:, -w:] - insample[:, -w:]).max(1) > 1e-4).all()
    # ... and equals what the fold's copy computes for its held-out rows
    for f in range(K):
        test = np.flatnonzero(cross.fold == f)
        mine = _features(crossfit["state"], rows.iloc[test], crossfit["on"], newest=cross.tensors[f])
        np.testing.assert_allclose(used[test, -w:], mine[:, -w:], rtol=0, atol=1e-5)
        np.testing.assert_allclose(mine[:, :-w], insample[test, :-w], rtol=0, atol=1e-6)
    from lorax.continual.state import read_info

    info = read_info(crossfit["state"])
    assert info["cross_fit"]["folds"] == K and info["cross_fit"]["rows"] == len(rows)
    assert len(info["cross_fit_seconds_per_task"]) == 1 and info["cross_fit_seconds_per_task"][0] > 0


def test_no_row_is_scored_by_a_copy_trained_on_it(crossfit):
    from lorax.continual.frozen_parts import adapter_producer
    from lorax.continual.state import load_state
    from lorax.data.groups import row_groups

    cross, rows, sources = crossfit["cross"], crossfit["rows"], crossfit["sources"]
    assert len(sources) == 1 + K  # the task itself, then one copy per fold
    assert len(sources[0]) == len(rows) and (rows["task"] != rows["task"].iloc[-1]).any()  # memory rows too
    ident = rows["path"].astype(str) + "|" + rows["sha256"].astype(str)
    assert sorted(np.bincount(cross.fold, minlength=K) > 0) == [True] * K
    groups = row_groups(rows).astype(str)
    for g in np.unique(groups):  # a group never straddles two folds
        assert len(np.unique(cross.fold[groups == g])) == 1
    for f, trained in enumerate(sources[1:]):
        held_out = set(ident[cross.fold == f])
        trained_on = set(trained["path"].astype(str) + "|" + trained["sha256"].astype(str))
        assert trained_on and not trained_on & held_out
        assert trained_on | held_out == set(ident)
        np.testing.assert_array_equal(np.sort(cross.train_index[f]), np.flatnonzero(cross.fold != f))
    # the copies' producers have keys of their own: nothing they computed is stored under the final adapter's key
    method, _ = load_state(crossfit["state"], params=crossfit["on"])
    final = adapter_producer(method, crossfit["on"], torch.device("cpu"), method.tasks[-1])[0]
    keys = [k for ks in cross.keys for k in ks]
    assert len(set(keys)) == K and final not in keys


def test_the_saved_model_is_the_cross_fit_0_model(crossfit):
    from safetensors.torch import load_file

    on, off = crossfit["state"] / "tensors", crossfit["state_off"] / "tensors"
    adapters = sorted(p.relative_to(on) for p in on.rglob("*.safetensors") if "adapters" in str(p))
    assert len(adapters) == 2
    for rel in adapters:
        a, b = load_file(str(on / rel)), load_file(str(off / rel))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (rel, k)
    head_on, head_off = load_file(str(on / "heads.safetensors")), load_file(str(off / "heads.safetensors"))
    for k in ("div_head.weight", "div_head.bias"):  # trained with the adapter: the same too
        assert torch.equal(head_on[k], head_off[k])
    assert not torch.equal(head_on["head.weight"], head_off["head.weight"])  # only the fit on the features changed


@pytest.mark.parametrize("method", ["trace", "lorax+trace"])
def test_trace_methods_cross_fit_their_experts(crossfit, method, monkeypatch):
    """The first task of the trace methods: the whole super-feature is the newest slice (adapter and / or expert);
    each copy's producers (both, for lorax+trace) are keyed apart from the final model's."""
    import lorax.continual.trainer as trainer_mod
    from lorax.continual.cross_fit import newest_keys
    from lorax.continual.state import load_state, read_info
    from lorax.continual.trainer import train_task

    seen = {}
    real = trainer_mod.cross_fit_features
    monkeypatch.setattr(trainer_mod, "cross_fit_features", lambda *a, **kw: seen.setdefault("x", real(*a, **kw)))
    params = tiny_params(crossfit["root"], continual__method=method, continual__head="refit", continual__cross_fit=2)
    first = params.tasks[0]
    state = train_task(None, crossfit["manifests"][first], None, params, crossfit["root"] / method / first)
    cross = seen["x"]
    final, _ = load_state(state, params=params)
    width = final.pair_dim if method == "lorax+trace" else params.trace.dim
    assert cross.newest.shape == (len(cross.fold), width)
    keys = newest_keys(final, params, torch.device("cpu"))
    assert len(keys) == {"trace": 1, "lorax+trace": 2}[method]
    assert all(len(ks) == len(keys) and not set(ks) & set(keys) for ks in cross.keys)
    assert read_info(state)["cross_fit"]["folds"] == 2


@pytest.mark.parametrize(("overrides", "message"), [
    ({"continual.cross_fit": 1}, "continual.cross_fit"),
    ({"continual.cross_fit": -2}, "continual.cross_fit"),
    ({"continual.cross_fit": 3}, "needs continual.head: refit, lda or ncm"),
    ({"continual.cross_fit": 3, "continual.head": "refit", "continual.method": "probe"}, "trains no per-task"),
])
def test_bad_cross_fit_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_params(None, **{k.replace(".", "__"): v for k, v in overrides.items()})
    tiny_params(None, continual__cross_fit=2, continual__head="ncm")  # what is allowed
