"""MoLE adapters inside LoRAX (adapter.kind: mole): interface of the LoRA set, one pass == sequential loop, frozen old
adapters, state round trip, balance loss in the task loss, and a tiny stream that trains end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lorax.continual.methods import build_method
from lorax.models.backbone_factory import create_backbone
from lorax.models import lorax_net
from lorax.models.lorax_net import LoRAXNet
from lorax.models.mole import MoLELinear
from lorax.models.mole_adapters import MoleAdapterLinear, MoleAdapterSet
from tests.helpers import tiny_params


def _net(**ov) -> LoRAXNet:
    p = tiny_params(adapter__kind="mole", **ov)
    return LoRAXNet(create_backbone(p.model), p.adapter)


def _perturb(net: LoRAXNet, name: str, seed: int) -> None:
    """Non-zero B matrices and a random router, so each adapter changes the embedding and routes tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in net.adapters.parameters(name):
            prm.add_(torch.randn(prm.shape, generator=g) * 0.3)


def test_kind_mole_builds_mole_adapters_on_the_lora_targets():
    net = _net()
    assert isinstance(net.adapters, MoleAdapterSet)
    lora = LoRAXNet(create_backbone(tiny_params().model), tiny_params().adapter)
    assert net.adapters.targets == lora.adapters.targets  # same target modules as the plain LoRA
    net.add_task("a")
    mods = dict(net.backbone.model.named_modules())
    for t in net.adapters.targets:
        assert isinstance(mods[t], MoleAdapterLinear)
        layer = mods[t].moles["a"]
        assert isinstance(layer, MoLELinear)
        assert layer.shared_rank == 8 and layer.expert_ranks == [4, 8, 16]
    # the frozen base layers are registered once (not once per task)
    net.add_task("b")
    names = [n for n, _ in net.backbone.model.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(id(p) for p in net.backbone.model.parameters()))
    assert not any(".moles." in k and ".base" in k for k in net.backbone.model.state_dict())


def test_only_newest_adapter_trains_and_params_match_analytic():
    net = _net()
    net.add_task("a")
    net.add_task("b")
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in net.trainable_parameters()}
    assert not any(id(p) in trainable for p in net.adapters.parameters("a"))
    assert net.adapters.n_params("b") == net.adapters.analytic_params() > 0
    assert net.analytic_trainable_params() == sum(p.numel() for p in net.trainable_parameters())


def test_zero_init_adapter_is_the_identity():
    net = _net()
    net.eval()
    x = torch.randn(3, 3, 16, 16)
    bb = net.backbone
    with torch.no_grad():
        ref = bb.pool(bb.run_blocks(bb.stem(x)))
        net.add_task("a")
        emb = net.embeddings(x)
    torch.testing.assert_close(emb[0], ref)


def test_one_pass_equals_sequential_loop_and_balance_loss():
    net = _net()
    for i, t in enumerate(["a", "b", "c"]):
        net.add_task(t)
        _perturb(net, t, i)
    net.eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        seq = net.embeddings(x, one_pass=False)  # the last single pass ran "c"
        bal_seq = net.adapters.balance_loss()
        fast = net.embeddings(x, one_pass=True)
        bal_fast = net.adapters.balance_loss()
    assert seq.shape == (3, 5, net.embed_dim)
    torch.testing.assert_close(fast, seq, rtol=1e-5, atol=1e-5)
    assert (seq[0] - seq[1]).abs().max() > 1e-3  # the adapters really differ
    torch.testing.assert_close(bal_fast, bal_seq)
    n_layers = len(net.adapters.targets)
    assert n_layers <= bal_seq.item() <= 3 * n_layers  # each layer's loss is in [1, N]


def test_one_pass_split_into_groups_equals_the_loop(monkeypatch):
    """MoLE adapters through a grouped pass split into smaller groups (CPU row limit): same embeddings and balance
    loss as the loop."""
    net = _net()
    for i, t in enumerate(["a", "b", "c"]):
        net.add_task(t)
        _perturb(net, t, i)
    net.eval()
    x = torch.randn(4, 3, 16, 16)
    monkeypatch.setattr(lorax_net, "CPU_GROUP_ROWS", 2 * net.trunk(x).shape[:-1].numel())  # groups [a, b] and [c]
    with torch.no_grad():
        seq = net.embeddings(x, one_pass=False)
        bal_seq = net.adapters.balance_loss()
        fast = net.embeddings(x, one_pass=True)
        bal_fast = net.adapters.balance_loss()
    torch.testing.assert_close(fast, seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bal_fast, bal_seq)
    assert (seq[1] - seq[2]).abs().max() > 1e-3


def test_old_adapters_frozen_and_state_round_trip(tmp_path):
    from lorax.continual.state import load_state, save_state

    params = tiny_params(tmp_path, adapter__kind="mole")
    method = build_method(params, ["a"])
    _perturb(method.net, "a", 0)
    old = method.net.adapters.state_dict("a")
    method.add_task("b")
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    method.train()
    for _ in range(2):
        loss = method.loss(method(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in method.net.adapters.state_dict("a").items():
        assert torch.equal(v, old[k]), k  # bit-identical after training the new task
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in method.net.adapters.state_dict("b").items()
               if "_B" in k)  # the new adapter did train

    method.eval()
    with torch.no_grad():
        logits = method(x)[0]
    save_state(method, tmp_path / "state", params, {"task": "b"})
    loaded, _ = load_state(tmp_path / "state", params=params)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], logits)
    sd = load_file(str(tmp_path / "state" / "tensors" / "adapters" / "b.safetensors"))
    assert any(k.endswith("router.weight") for k in sd) and sd.keys() == method.net.adapters.state_dict("b").keys()


def test_balance_loss_joins_the_task_loss():
    params = tiny_params(adapter__kind="mole", adapter__mole__balance_weight=0.5)
    method = build_method(params, ["a", "b"])
    method.eval()
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 3])
    out = method(x)
    logits, aux = out
    plain = F.cross_entropy(logits, y) + method.aux_weight * F.cross_entropy(aux, torch.tensor([0, 0, 2]))
    bal = method.net.adapters.balance_loss()
    assert bal.item() > 0
    torch.testing.assert_close(method.loss(out, y), plain + 0.5 * bal)
    grads = torch.autograd.grad(method.loss(out, y), method.net.adapters.parameters("b"), allow_unused=True)
    routers = [g for p, g in zip(method.net.adapters.parameters("b"), grads, strict=True) if p.dim() == 2
               and p.shape[0] == 3 and g is not None]
    assert routers and any(g.abs().sum() > 0 for g in routers)  # the balance loss reaches the routers


def test_bad_input():
    net = _net()
    net.add_task("a")
    with pytest.raises(ValueError, match="exists already"):
        net.adapters.add("a")
    with pytest.raises(ValueError, match="without '.'"):
        net.adapters.add("a.b")
    sd = net.adapters.state_dict("a")
    key = next(iter(sd))
    with pytest.raises(ValueError, match="missing keys"):
        net.adapters.load_state_dict("a", {k: v for k, v in sd.items() if k != key})
    bad = dict(sd)
    bad[key] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="shape"):
        net.adapters.load_state_dict("a", bad)
    with pytest.raises(KeyError, match="no MoLE adapter named"):
        net.adapters.parameters("zzz")
    with pytest.raises(ValueError, match="matches no Linear"):
        _net(adapter__target_modules=r".*\.nothing$")


def test_tiny_stream_trains_with_kind_mole(tmp_path):
    from lorax.continual.state import load_state
    from pipelines.train_stream import run_stream
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    params = tiny_params(tmp_path, adapter__kind="mole")
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    metrics = run_stream(params, params.data.manifests, tmp_path / "out")
    assert len(metrics["acc_matrix"]) == 2 and metrics["aaf"] is not None
    first, _ = load_state(tmp_path / "out" / "state" / "deconv", params=params)
    last, _ = load_state(tmp_path / "out" / "state" / "nnconv", params=params)
    assert isinstance(last.net.adapters, MoleAdapterSet)
    a, b = first.net.adapters.state_dict("deconv"), last.net.adapters.state_dict("deconv")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # old adapter untouched by task 2
