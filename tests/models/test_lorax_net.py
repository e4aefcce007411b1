"""The LoRAX network: adapters per task, frozen old parts, head growth, one-pass == sequential loop."""

from __future__ import annotations

import pytest
import torch

from lorax.models.backbone_factory import create_backbone
from lorax.models.lorax_net import LoRAXNet, diversity_targets
from tests.helpers import tiny_params


def _net(**ov) -> LoRAXNet:
    p = tiny_params(**ov)
    return LoRAXNet(create_backbone(p.model), p.adapter)


def _perturb(net: LoRAXNet, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in net.adapters.parameters(name):
            prm.add_(torch.randn(prm.shape, generator=g) * 0.1)


def test_one_pass_equals_sequential_loop():
    net = _net()
    for i, t in enumerate(["a", "b", "c"]):
        net.add_task(t)
        _perturb(net, t, i)
    net.eval()
    x = torch.randn(5, 3, 16, 16)
    seq = net.embeddings(x, one_pass=False)
    fast = net.embeddings(x, one_pass=True)
    assert seq.shape == (3, 5, net.embed_dim)
    torch.testing.assert_close(fast, seq, rtol=1e-5, atol=1e-5)
    # the adapters really differ, so equality is not trivial
    assert (seq[0] - seq[1]).abs().max() > 1e-3


def test_shared_trunk_equals_full_pass():
    net = _net(adapter__blocks="last_k", adapter__last_k=1)
    assert net.branch_block == 1
    for i, t in enumerate(["a", "b"]):
        net.add_task(t)
        _perturb(net, t, i)
    net.eval()
    x = torch.randn(4, 3, 16, 16)
    emb = net.embeddings(x)
    # reference: the full backbone with one adapter active at a time, no trunk sharing
    bb, route = net.backbone, net.adapters.route
    for k, t in enumerate(["a", "b"]):
        with route.using(t):
            ref = bb.pool(bb.run_blocks(bb.stem(x)))
        torch.testing.assert_close(emb[k], ref, rtol=1e-5, atol=1e-5)
    assert all(t.startswith("blocks.1.") for t in net.adapters.targets)
    assert route.mode == "off"


def test_head_grows_and_keeps_old_weights():
    net = _net()
    net.add_task("a")
    old_w, old_b = net.head.weight.detach().clone(), net.head.bias.detach().clone()
    net.add_task("b")
    d = net.embed_dim
    assert net.head.weight.shape == (4, 2 * d)
    torch.testing.assert_close(net.head.weight[:2, :d], old_w)
    torch.testing.assert_close(net.head.bias[:2], old_b)
    assert net.div_head.weight.shape == (3, d)


def test_only_newest_adapter_and_heads_train():
    net = _net()
    net.add_task("a")
    net.add_task("b")
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    expected = {id(p) for p in net.trainable_parameters()}
    assert trainable == expected
    assert not any(id(p) in trainable for p in net.adapters.parameters("a"))
    assert net.analytic_trainable_params() == sum(p.numel() for p in net.trainable_parameters())


def test_regex_matching_nothing_lists_modules():
    with pytest.raises(ValueError, match=r"matches no Linear module.*blocks\.0\.attn"):
        _net(adapter__target_modules=r".*\.nothing_here$")


def test_diversity_targets():
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    assert diversity_targets(y, 2).tolist() == [0, 0, 0, 0, 1, 2]
    assert diversity_targets(y, 1).tolist() == [0, 0, 1, 2, 0, 0]


def test_convit_base_paper_config_parameter_share():
    """Trainable parameters per task on convit_base with the paper's adapter config, against the backbone."""
    p = tiny_params(model__kwargs={}, model__img_size=224, adapter__r=64, adapter__alpha=16.0, data__source="folder")
    p.model.backbone = "convit_base"
    with torch.device("meta"):
        bb = create_backbone(p.model)
    net = LoRAXNet(bb, p.adapter)
    backbone_params = sum(q.numel() for q in bb.parameters())
    adapter = net.adapters.analytic_params()
    assert 85e6 < backbone_params < 87e6
    # r * (in + out) over every targeted Linear: GPSA blocks 0-9 (qk, v, proj, pos_proj), MHSA 10-11 (qkv, proj)
    d, r, h = 768, 64, 16
    gpsa = r * ((d + 2 * d) + (d + d) + (d + d) + (3 + h))
    mhsa = r * ((d + 3 * d) + (d + d))
    assert adapter == 10 * gpsa + 2 * mhsa


@pytest.mark.parametrize(
    "regex, expected_share",
    [
        (r".*\.attn\.(qk|v|qkv|proj|pos_proj)$", 4.72),  # every attention Linear (params.yaml default)
        (r".*\.attn.qkv|.*\.attn.qk|.*\.attn.v|\.attn\.pos_proj|\.attn\.proj", 3.33),  # published regex, fullmatch
        (r"blocks\.\d\.attn\.(qk|v)$", 2.87),  # qk, v of the GPSA blocks: the paper's "~2.5M"
    ],
)
def test_convit_base_trainable_share_per_task(regex: str, expected_share: float):
    """Per-task trainable parameters (adapter + head + diversity head, first task) as % of convit_base."""
    p = tiny_params(model__kwargs={}, model__img_size=224, adapter__r=64, adapter__alpha=16.0, data__source="folder",
                    adapter__target_modules=regex)
    p.model.backbone = "convit_base"
    with torch.device("meta"):
        net = LoRAXNet(create_backbone(p.model), p.adapter)
        net.add_task("gaugan")
    backbone = sum(q.numel() for n, q in net.backbone.named_parameters() if "lora_" not in n)
    assert 85e6 < backbone < 87e6
    trainable = net.analytic_trainable_params()
    assert trainable == sum(q.numel() for q in net.trainable_parameters())
    share = 100 * trainable / backbone
    print(f"{regex}: {trainable} trainable / {backbone} backbone = {share:.2f}%")
    assert share == pytest.approx(expected_share, abs=0.01)
    if expected_share < 3:
        assert share < 3.0


def test_feature_levels_join_every_embedding_and_agree_across_paths(params) -> None:
    """model.feature_levels: each adapter's embedding = level features (layer-normed first + mean token of those
    blocks) then the pooled last block; the grouped pass, the sequential loop and the backbone's own forward agree."""
    from lorax.continual.methods import build_method

    base = build_method(params)
    p = params.model_copy(deep=True)
    p.model.feature_levels = [1, 2]
    p.adapter.blocks, p.adapter.last_k = "last_k", 1
    method = build_method(p)
    bb = method.net.backbone
    assert bb.levels == (0, 1) and bb.feature_dim == 5 * bb.embed_dim == 5 * base.net.backbone.embed_dim
    for t in ("a", "b"):
        method.add_task(t)
    net = method.net.eval()
    x = torch.randn(3, 3, p.model.img_size, p.model.img_size)
    with torch.no_grad():
        grouped = net.embeddings(x, one_pass=True)
        seq = net.embeddings(x, one_pass=False)
        plain = bb(x)
    assert grouped.shape == (2, 3, net.embed_dim) == seq.shape and net.head.in_features == 2 * net.embed_dim
    assert torch.allclose(grouped, seq, atol=1e-5)
    d = bb.embed_dim
    # block 1 is below the adapted block: the same for every adapter and equal to the plain backbone's
    assert torch.allclose(grouped[0, :, : 2 * d], grouped[1, :, : 2 * d]) and torch.allclose(grouped[0, :, : 2 * d], plain[:, : 2 * d], atol=1e-5)
    with pytest.raises(ValueError, match="exceed the backbone"):
        bb.set_levels([99])
