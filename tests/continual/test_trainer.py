"""train_task: frozen old parts, exact CPU reproduction, resume from the epoch checkpoint, non-finite loss."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lorax.continual import trainer
from lorax.continual.state import is_state, load_state, read_info
from lorax.continual.selection import select_exemplars
from lorax.continual.trainer import NonFiniteLossError, train_task
from lorax.models.backbone_factory import create_backbone
from tests.helpers import tiny_params

FIRST, SECOND = "deconv", "nnconv"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The tiny two-task zoo, prepared, and the LoRAX state + exemplar memory after the first task."""
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    root = tmp_path_factory.mktemp("trainer")
    params = tiny_params(root)
    assert params.tasks == [FIRST, SECOND]
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    manifests = load_stream_manifests(params.data.manifests, params.tasks)
    state0 = train_task(None, manifests[FIRST], None, params, root / "state0")
    memory0 = select_exemplars(load_state(state0, params=params)[0], manifests[FIRST], None, params)
    assert len(memory0) > 0
    return params, manifests, state0, memory0


def _hashes(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


def _capture_saved_method(monkeypatch) -> list:
    """Record the in-memory method that train_task hands to the real save_state (the saved state does not hold
    the frozen backbone, so only the live object shows whether training touched it)."""
    seen: list = []
    real = trainer.save_state

    def save_state(method, *args, **kwargs):
        seen.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_state", save_state)
    return seen


def test_old_adapters_and_backbone_bit_identical_after_next_task(zoo, tmp_path, monkeypatch):
    params, manifests, state0, memory0 = zoo
    before, _ = load_state(state0, params=params)
    seen = _capture_saved_method(monkeypatch)
    out = train_task(state0, manifests[SECOND], memory0, params, tmp_path / "state1")
    (after,) = seen
    net0, net1 = before.net, after.net

    old_adapter = {id(p) for p in net0.adapters.parameters(FIRST)}
    frozen = dict(net0.backbone.named_parameters())  # the backbone plus adapter FIRST (peft injects it there)
    trained = dict(net1.backbone.named_parameters())
    assert any(id(p) in old_adapter for p in frozen.values())
    assert len(frozen) > len(old_adapter)
    for name, p in frozen.items():
        assert torch.equal(p, trained[name]), f"{name} changed while training task {SECOND}"
    # the new adapter and the head did train (so the equality above is not a training no-op)
    new_b = [p for n, p in trained.items() if f"lora_B.{SECOND}." in n]  # LoRA B starts at zero
    assert new_b and all(p.abs().sum() > 0 for p in new_b)
    assert not torch.equal(net0.head.weight, net1.head.weight[:2, : net0.head.weight.shape[1]])

    info = read_info(out)
    analytic = net1.analytic_trainable_params()
    assert sum(p.numel() for p in after.trainable_parameters()) == analytic
    assert {id(p) for p in after.parameters() if p.requires_grad} == {id(p) for p in after.trainable_parameters()}
    assert info["trainable_params_per_task"] == [net0.analytic_trainable_params(), analytic]
    # the frozen backbone's size, without the LoRA weights that peft injects into it
    assert info["backbone_params"] == sum(p.numel() for p in create_backbone(params.model).parameters())

    # the saved state is the trained model: reloaded, it gives the same logits
    reloaded, _ = load_state(out, params=params)
    x = torch.randn(4, 3, params.model.img_size, params.model.img_size, generator=torch.Generator().manual_seed(0))
    after.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(after(x)[0], reloaded(x)[0])


def test_cpu_runs_reproduce_exactly(zoo, tmp_path):
    params, manifests, state0, memory0 = zoo
    a = train_task(state0, manifests[SECOND], memory0, params, tmp_path / "a")
    b = train_task(state0, manifests[SECOND], memory0, params, tmp_path / "b")
    ha, hb = _hashes(a / "tensors"), _hashes(b / "tensors")
    assert ha and ha == hb
    ia, ib = read_info(a), read_info(b)
    assert ia["epochs"] == ib["epochs"] and len(ia["epochs"]) == params.train.epochs
    assert ia["trainable_params_per_task"] == ib["trainable_params_per_task"]
    ma = select_exemplars(load_state(a, params=params)[0], manifests[SECOND], memory0, params)
    mb = select_exemplars(load_state(b, params=params)[0], manifests[SECOND], memory0, params)
    assert ma.rows().equals(mb.rows())


def test_interrupted_task_resumes_from_its_epoch_checkpoint(zoo, tmp_path):
    params, manifests, state0, memory0 = zoo
    p2 = tiny_params(Path(params.data.root).parent, train__epochs=2)
    task_df = manifests[SECOND]

    full_epochs: list[int] = []
    full = train_task(state0, task_df, memory0, p2, tmp_path / "full", callback=lambda e, row: full_epochs.append(e))
    assert full_epochs == [1, 2]

    def interrupt(epoch: int, row: dict) -> None:
        if epoch == 1:  # Ctrl-C once epoch 1 is reported: its checkpoint is on disk (written before the report)
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_task(state0, task_df, memory0, p2, out, callback=interrupt)
    assert not is_state(out)
    ckpt = trainer._ckpt_path(out)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["task"] == SECOND and saved["epoch"] == 0

    resumed_epochs: list[int] = []
    train_task(state0, task_df, memory0, p2, out, callback=lambda e, row: resumed_epochs.append(e))
    assert resumed_epochs == [2], "the resumed run must start at epoch 2"
    assert not ckpt.parent.exists()
    assert _hashes(out / "tensors") == _hashes(full / "tensors")
    assert read_info(out)["epochs"] == read_info(full)["epochs"]


def test_non_finite_loss_names_task_epoch_step_and_keeps_previous_state(zoo, tmp_path):
    params, manifests, state0, memory0 = zoo
    bad = tiny_params(Path(params.data.root).parent, train__lr_later=1e30, train__grad_clip=None)
    before = _hashes(state0)
    out = tmp_path / "diverged"
    with pytest.raises(NonFiniteLossError, match=rf"task {SECOND}, epoch 1, step \d+: loss is (nan|inf)") as e:
        train_task(state0, manifests[SECOND], memory0, bad, out)
    assert "previous state is untouched" in str(e.value)
    assert _hashes(state0) == before
    assert not is_state(out) and not out.exists()
    # and the previous state still loads and continues with sane settings
    good = train_task(state0, manifests[SECOND], memory0, params, out)
    assert read_info(good)["tasks"] == [FIRST, SECOND]


def test_replay_size_trains_on_a_prefix_of_the_memory_and_fits_on_all_of_it(zoo, tmp_path):
    """``continual.replay_size``: the gradient training sees exactly ``memory.replay(size)`` (the same tensors as a
    run given that smaller memory), while the verdict / head fits read the whole memory."""
    params, manifests, state0, memory0 = zoo
    size = len(memory0) // 2
    small = memory0.replay(size)
    per_class = size // len(memory0.classes())
    assert set(small.class_counts().values()) == {per_class}
    for c in small.classes():  # the first by rank of each kind
        kept, full = small.rows(), memory0.rows()
        for kind in (True, False):
            k = kept[(kept["class_id"] == c) & (kept["calib"] == kind)]["path"].tolist()
            f = full[(full["class_id"] == c) & (full["calib"] == kind)]["path"].tolist()
            assert k == f[:len(k)]
    assert memory0.replay(None) is memory0 and memory0.replay(len(memory0)) is memory0

    replayed = params.model_copy(deep=True)
    replayed.continual.replay_size = size
    a = train_task(state0, manifests[SECOND], memory0, replayed, tmp_path / "a")
    b = train_task(state0, manifests[SECOND], small, params, tmp_path / "b")
    assert _hashes(a / "tensors") == _hashes(b / "tensors")
    n_train = int((manifests[SECOND]["split"] == "train").sum())
    ia, ib = read_info(a), read_info(b)
    assert ia["training_rows"] == ib["training_rows"] == n_train + len(small)
    assert ia["replayed_exemplars"] == len(small)
    assert ia["fit_rows"] == n_train + len(memory0) > ib["fit_rows"] == n_train + len(small)


def test_replay_size_with_cross_fit_is_refused():
    with pytest.raises(ValueError, match="replay_size"):
        tiny_params(continual__replay_size=10, continual__cross_fit=2, continual__head="refit")
