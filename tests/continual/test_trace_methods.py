"""The trace methods (lorax/continual/trace_methods.py) on a tiny 2-task stream: experts freeze after their task,
old experts' embeddings come from the feature store (never recomputed), the memory re-reads native pixels."""

from __future__ import annotations

import pytest
import torch

from lorax.continual.batch_source import BatchSource
from lorax.continual.distributed import DistContext
from lorax.continual.evaluation import predict_logits, val_rows
from lorax.continual.memory import ExemplarMemory
from lorax.continual.state import load_state, load_tensor_groups
from lorax.continual.trainer import training_rows
from lorax.features import open_store
from lorax.models.trace import TraceExpert
from pipelines.train_stream import run_stream
from tests.helpers import tiny_params

METHODS = ("trace", "lorax+trace")


@pytest.fixture
def streams(trace_streams):
    return trace_streams  # trained once per session (tests/conftest.py)


def _no_expert(*a, **k):
    raise AssertionError("a frozen trace expert ran again")


@pytest.mark.parametrize("name", METHODS)
def test_a_two_task_stream_trains_and_evaluates(streams, name):
    _, out = streams
    params, _, metrics = out[name]
    assert metrics["method"] == name and metrics["tasks"] == params.tasks
    assert all(0 <= v <= 100 for v in (metrics["aa"], metrics["binary_acc"]))
    assert len(metrics["trace_params_per_task"]) == 2 and metrics["trace_params_per_task"][0] > 0


@pytest.mark.parametrize("name", METHODS)
def test_an_expert_is_frozen_after_its_task(streams, name):
    _, out = streams
    params, run, _ = out[name]
    first, second = (load_tensor_groups(run / "state" / t) for t in params.tasks)
    key = f"experts/{params.tasks[0]}"
    assert first[key].keys() == second[key].keys()
    for k, v in first[key].items():  # byte-equal after the next task
        assert v.dtype == second[key][k].dtype and v.numpy().tobytes() == second[key][k].numpy().tobytes(), k
    new = second[f"experts/{params.tasks[1]}"]
    assert any(not torch.equal(v, new[k]) for k, v in first[key].items())  # the next task trained its own


@pytest.mark.parametrize("name", METHODS)
def test_the_store_serves_every_experts_embeddings(streams, name, monkeypatch):
    """After the stream's own evaluation, evaluating the same state again computes no expert embedding."""
    manifests, out = streams
    params, run, _ = out[name]
    method, _ = load_state(run / "state" / params.tasks[-1], params=params)
    val = val_rows([manifests[t] for t in params.tasks])
    store = open_store(params.cache)
    first, feats = predict_logits(method, val, params, torch.device("cpu"), features=True, store=store)
    monkeypatch.setattr(TraceExpert, "forward", _no_expert)
    again, feats2 = predict_logits(method, val, params, torch.device("cpu"), features=True, store=store)
    assert (first == again).all() and (feats == feats2).all()
    d = params.trace.dim + (method.net.embed_dim if name == "lorax+trace" else 0)
    assert feats.shape == (len(val), d * len(params.tasks))  # the super-feature: one slice per task


@pytest.mark.parametrize("name", METHODS)
def test_old_experts_run_once_per_training_view(streams, name, monkeypatch):
    """Task 2's batches take the old expert's embeddings of each training view from the store: a second batch
    source over the same rows runs no old expert (only the newest trains on patches)."""
    manifests, out = streams
    params, run, _ = out[name]
    method, _ = load_state(run / "state" / params.tasks[0], params=params)
    method.add_task(params.tasks[1])
    memory = ExemplarMemory.load(run / "memory" / f"{params.tasks[0]}.parquet", params.data.root)
    rows = training_rows(method, manifests[params.tasks[1]], memory)
    store, device, ctx = open_store(params.cache), torch.device("cpu"), DistContext()
    BatchSource(rows, method, params, 0, device, ctx, store)  # filled by the stream already, or now
    old = method.expert(params.tasks[0])
    monkeypatch.setattr(old, "forward", _no_expert)
    source = BatchSource(rows, method, params, 0, device, ctx, store)
    batch = next(iter(source.epoch(0)))
    assert batch.x.patches.dtype == torch.uint8
    assert batch.x.patches.shape[1:] == (params.trace.patches, 3, params.trace.patch, params.trace.patch)
    assert batch.x.old.shape == (len(batch.targets), 1, params.trace.dim)
    method.train()
    logits, _ = method(batch.x)
    assert logits.shape == (len(batch.targets), 4)


def test_the_memory_keeps_what_the_expert_reads(streams):
    """The memory holds manifest rows (path, sha256, size): the expert re-reads their native pixels from the files."""
    _, out = streams
    params, run, _ = out["trace"]
    mem = ExemplarMemory.load(run / "memory" / f"{params.tasks[0]}.parquet", params.data.root).manifest()
    assert len(mem) and {"root", "path", "sha256", "width", "height"} <= set(mem.columns)
    assert set(mem["class_id"]) == {0, 1}


def test_trace_methods_need_fixed_views(streams):
    manifests, _ = streams
    params = tiny_params(continual__method="trace", train__views=0)
    from lorax.continual.methods import build_method

    method = build_method(params, ["a"])
    rows = manifests[params.tasks[0]]
    with pytest.raises(ValueError, match="train.views"):
        BatchSource(rows[rows["split"] == "train"], method, params, 0, torch.device("cpu"), DistContext(),
                    open_store(params.cache))


def test_results_do_not_depend_on_the_store_on_disk(streams, tmp_path):
    """The same stream with the store in memory (cache.enabled false) gives the same figures."""
    _, out = streams
    params, _, metrics = out["trace"]
    mem = params.model_copy(deep=True)
    mem.cache.enabled = False
    again = run_stream(mem, params.data.manifests, tmp_path / "in_memory")
    assert again["acc_matrix"] == metrics["acc_matrix"] and again["binary_acc"] == metrics["binary_acc"]


def test_an_expert_producer_is_keyed_by_its_tensors_and_settings():
    from lorax.continual.methods import build_method
    from lorax.continual.trace_parts import expert_producer

    params = tiny_params(continual__method="trace")
    method = build_method(params, ["a", "b"])
    cpu = torch.device("cpu")
    keys = {t: expert_producer(method, params, cpu, t)[0] for t in ("a", "b")}
    assert keys["a"] != keys["b"]
    with torch.no_grad():
        next(method.expert("b").parameters()).add_(1.0)
    assert expert_producer(method, params, cpu, "b")[0] != keys["b"]
    assert expert_producer(method, params, cpu, "a")[0] == keys["a"]
    wider = tiny_params(continual__method="trace", trace__patches=6)
    assert expert_producer(method, wider, cpu, "a")[0] != keys["a"]
