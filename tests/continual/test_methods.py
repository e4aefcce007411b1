"""Every registered continual method in the same harness: a 2-task stream, metrics.json, what trains, data, groups.

Parametrized over ``METHODS.names()``, so a newly registered method is covered without editing this file.
"""

from __future__ import annotations

import json

import pytest
import torch

import lorax.continual.methods  # noqa: F401  (registers the methods)
from lorax.continual import trainer
from lorax.continual.memory import ExemplarMemory
from lorax.continual.methods import build_method
from lorax.continual.state import load_state, load_tensor_groups
from lorax.continual.summary import read_metrics
from pipelines.train_stream import run_stream
from lorax.continual.trainer import training_rows
from lorax.data.manifest import read_manifest
from lorax.models.backbone_factory import create_backbone
from lorax.registry import METHODS
from tests.helpers import tiny_params

NAMES = METHODS.names()
METRIC_KEYS = {"aa", "aaf", "bwt", "forgetting", "binary_acc", "acc_matrix", "tasks", "trainable_params_per_task",
               "backbone_params", "seconds_per_task"}
# methods whose whole backbone trains (in the slow optimizer group); the others train adapters or a head only
FULL_BACKBONE = {"finetune": True, "joint": True, "der": True, "lorax": False, "probe": False, "trace": False,
                 "lorax+trace": False}


def test_the_paper_methods_are_registered():
    assert {"lorax", "finetune", "der", "joint", "probe"} <= set(NAMES)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The tiny two-task zoo, prepared once for the module; streams trained lazily, once per method."""
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    root = tmp_path_factory.mktemp("methods")
    params = tiny_params(root)
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    return root, {}


def _stream(zoo, name: str):
    root, done = zoo
    if name not in done:
        params = tiny_params(root, continual__method=name)
        out = root / f"out_{name}"
        done[name] = params, out, run_stream(params, params.data.manifests, out)
    return done[name]


def _n(params_list) -> int:
    return sum(p.numel() for p in params_list)


@pytest.mark.parametrize("name", NAMES)
def test_two_task_stream_writes_metrics(zoo, name):
    params, out, metrics = _stream(zoo, name)
    on_disk = read_metrics(out / "metrics.json")  # with its details file
    assert on_disk == json.loads(json.dumps(metrics))
    assert METRIC_KEYS <= set(on_disk)
    assert on_disk["method"] == name
    assert on_disk["tasks"] == params.tasks and len(params.tasks) == 2

    R = on_disk["acc_matrix"]
    assert len(R) == 2 and all(len(row) == 2 for row in R)
    assert R[1][0] is None  # task 1 is not evaluated before it is trained
    seen = [R[0][0], R[0][1], R[1][1]]
    assert all(0.0 <= v <= 100.0 for v in seen)
    for key in ("aa", "aaf", "binary_acc"):
        assert 0.0 <= on_disk[key] <= 100.0, key
    assert on_disk["aaf"] == pytest.approx((R[0][1] + R[1][1]) / 2, abs=1e-3)
    assert on_disk["bwt"] == pytest.approx(R[0][1] - R[0][0], abs=1e-3)
    assert on_disk["forgetting"] == pytest.approx(-on_disk["bwt"], abs=1e-3)
    assert len(on_disk["seconds_per_task"]) == 2 and all(s >= 0 for s in on_disk["seconds_per_task"])

    # parameter accounting: the backbone's own size for every method, and what trains per task
    backbone = create_backbone(params.model)
    b, d = _n(backbone.parameters()), backbone.embed_dim
    assert on_disk["backbone_params"] == (0 if name == "trace" else b)  # trace alone has no backbone
    expected = {
        "probe": [2 * d + 2, 2 * d * 2 + 4],
        "finetune": [b + 2 * d + 2, b + 2 * d * 2 + 4],
        "joint": [b + 2 * d + 2, b + 2 * d * 2 + 4],
        "der": [b + 2 * d + 2 + 3 * d + 3, b + 2 * d * 4 + 4 + 3 * d + 3],
    }
    if name == "lorax":
        expected[name] = [build_method(params, params.tasks[: i + 1]).net.analytic_trainable_params() for i in (0, 1)]
    if name in ("trace", "lorax+trace"):  # the newest expert, reported beside the total
        expert = sum(p.numel() for p in build_method(params, params.tasks[:1]).experts.list[0].parameters())
        assert on_disk["trace_params_per_task"] == [expert, expert]
        assert len(on_disk["trace_forward_seconds_per_task"]) == 2
        e = params.trace.dim + (d if name == "lorax+trace" else 0)  # one task's slice of the super-feature
        head = [e * 2 + 2 + 3 * e + 3, e * 2 * 4 + 4 + 3 * e + 3]
        if name == "trace":
            expected[name] = [expert + h for h in head]
        else:
            lora = build_method(params, params.tasks[:1]).net.adapters.analytic_params()
            assert on_disk["adapter_params_per_task"] == [lora, lora]
            expected[name] = [expert + lora + h for h in head]
    if name in expected:
        assert on_disk["trainable_params_per_task"] == expected[name]


@pytest.mark.parametrize("name", NAMES)
def test_only_trainable_parameters_change_in_training(zoo, name, monkeypatch):
    """Train the first task; everything outside ``trainable_parameters()`` equals a freshly built method."""
    root, _ = zoo
    params = tiny_params(root, continual__method=name)
    task = params.tasks[0]
    seen = []
    real = trainer.save_state
    monkeypatch.setattr(trainer, "save_state", lambda m, *a, **k: (seen.append(m), real(m, *a, **k))[1])
    df = read_manifest(f"{params.data.manifests}/{task}.parquet", params.data.root)
    trainer.train_task(None, df, None, params, root / f"first_{name}")
    (method,) = seen
    fresh = build_method(params, [task])
    trainable = {id(p) for p in method.trainable_parameters()}
    assert {id(p) for p in method.parameters() if p.requires_grad} == trainable
    live = dict(method.named_parameters())
    frozen = [n for n, p in live.items() if id(p) not in trainable]
    for n in frozen:
        assert torch.equal(live[n], dict(fresh.named_parameters())[n]), f"{name}: frozen {n} changed"
    if name == "probe":  # only the head trains: the backbone is frozen and unchanged
        assert trainable == {id(p) for p in method.head.parameters()}
        assert all(n in frozen for n, _ in method.backbone.named_parameters(prefix="backbone"))
    if FULL_BACKBONE.get(name):  # the backbone did train (at the slow lr)
        bb = method.backbones[-1] if name == "der" else method.backbone
        ref = fresh.backbones[-1] if name == "der" else fresh.backbone
        assert any(not torch.equal(p, q) for p, q in zip(bb.parameters(), ref.parameters(), strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_param_groups(name):
    params = tiny_params(continual__method=name)
    method = build_method(params, ["a", "b"])
    lr = 1e-3
    groups = method.param_groups(lr)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter in two optimizer groups"
    assert set(ids) == {id(p) for p in method.trainable_parameters()}
    assert groups[0]["lr"] == lr
    backbone = method.backbone_parameters()
    if name in FULL_BACKBONE:
        assert bool(backbone) == FULL_BACKBONE[name]
    if backbone:
        assert len(groups) == 2
        assert groups[1]["lr"] == pytest.approx(lr * params.train.backbone_lr_scale)
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in backbone}
    else:
        assert len(groups) == 1
    if name == "der":  # only the newest backbone copy trains
        assert {id(p) for p in backbone} == {id(p) for p in method.backbones[-1].parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_training_rows(zoo, name):
    """Joint trains on all earlier tasks' data (no memory); the others on this task plus the exemplars."""
    root, _ = zoo
    params = tiny_params(root, continual__method=name)
    first, second = (read_manifest(f"{params.data.manifests}/{t}.parquet", params.data.root) for t in params.tasks)
    memory = ExemplarMemory(first[first["split"] == "train"].head(4).assign(rank=range(4)))
    method = build_method(params, params.tasks)
    rows = training_rows(method, second, memory, history=[first])
    n_first, n_second = ((df["split"] == "train").sum() for df in (first, second))
    assert (rows["split"] == "train").all()
    if method.cumulative_data:
        assert len(rows) == n_first + n_second
        assert set(rows["task"]) == set(params.tasks)
    elif method.uses_memory:
        assert len(rows) == n_second + 4
    else:
        assert len(rows) == n_second
    assert method.cumulative_data == (name == "joint") or name not in FULL_BACKBONE


def test_der_adds_a_frozen_backbone_per_task(zoo):
    params, out, _ = _stream(zoo, "der")
    s0, s1 = ((out / "state" / t) for t in params.tasks)
    g0, g1 = load_tensor_groups(s0), load_tensor_groups(s1)
    assert sorted(k for k in g1 if k.startswith("backbones/")) == [f"backbones/{t}" for t in params.tasks]
    old = f"backbones/{params.tasks[0]}"
    assert all(torch.equal(v, g1[old][k]) for k, v in g0[old].items())  # the first copy froze after task 0
    new = g1[f"backbones/{params.tasks[1]}"]
    assert any(not torch.equal(v, new[k]) for k, v in g0[old].items())  # the second copy trained on
    method, _ = load_state(s1, params=params)
    assert len(method.backbones) == 2


@pytest.mark.parametrize("name", ["finetune", "joint"])
def test_full_backbone_methods_save_their_trained_backbone(zoo, name):
    params, out, _ = _stream(zoo, name)
    g0, g1 = (load_tensor_groups((out / "state" / t)) for t in params.tasks)
    assert any(not torch.equal(v, g1["backbone"][k]) for k, v in g0["backbone"].items())
