"""Grouped one-pass forward beyond test_lorax: reused weight stacks stay correct, gradients, trunk + cached embeddings."""

from __future__ import annotations

import torch

from lorax.models.backbones import create_backbone
from lorax.models.lorax import LoRAXNet
from tests.conftest import tiny_params


def _net(**ov) -> LoRAXNet:
    p = tiny_params(adapter__dropout=0.0, **ov)
    net = LoRAXNet(create_backbone(p.model), p.adapter)
    g = torch.Generator().manual_seed(0)
    for t in ("a", "b", "c"):
        net.add_task(t)
        with torch.no_grad():
            for prm in net.adapters.parameters(t):
                prm.add_(torch.randn(prm.shape, generator=g) * 0.1)
    return net


def test_reused_stacks_follow_weight_changes():
    """The frozen group's stacked weights are kept between calls; any change of a weight must refresh them."""
    net = _net().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        first = net.embeddings(x, one_pass=True)
        torch.testing.assert_close(net.embeddings(x, one_pass=True), first)  # reused stack, same result
        for prm in net.adapters.parameters("b"):  # in-place change, as an optimizer step or load_state_dict does
            prm.mul_(1.5)
        fast = net.embeddings(x, one_pass=True)
        seq = net.embeddings(x, one_pass=False)
    torch.testing.assert_close(fast, seq, rtol=1e-5, atol=1e-5)
    assert (fast[1] - first[1]).abs().max() > 1e-4  # "b" really changed and the pass saw it
    torch.testing.assert_close(fast[0], first[0])
    # a state loaded into an adapter (copy_) is seen too
    sd = {k: v * 0 for k, v in net.adapters.state_dict("c").items()}
    net.adapters.load_state_dict("c", sd)
    with torch.inference_mode():
        torch.testing.assert_close(net.embeddings(x, one_pass=True), net.embeddings(x, one_pass=False),
                                   rtol=1e-5, atol=1e-5)


def test_grouped_training_pass_gradients_equal_the_loop():
    net = _net()
    net.train()
    x = torch.randn(4, 3, 16, 16)
    grads = []
    for one_pass in (True, False):
        for p in net.trainable_parameters():
            p.grad = None
        logits, div = net.classify(net.embeddings(x, one_pass=one_pass))
        (logits.square().mean() + div.square().mean()).backward()
        grads.append([p.grad.clone() for p in net.adapters.parameters("c")])
    assert all(g.abs().max() > 0 for g in grads[0][1::2])  # B matrices of the trained adapter get gradients
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in net.adapters.parameters("a"))  # frozen adapters get none


def test_shared_trunk_with_cached_old_embeddings_equals_full_forward():
    """forward(x, old_emb) with the frozen adapters' embeddings from a separate pass == the full forward."""
    net = _net(adapter__blocks="last_k", adapter__last_k=1).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        old = net.embeddings(x, ["a", "b"])
        cached = net(x, old_emb=old)
        full = net(x)
    torch.testing.assert_close(cached[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[1], full[1], rtol=1e-5, atol=1e-5)


def test_batch_of_identical_rows_is_computed_once_with_the_same_result():
    """ConViT's GPSA feeds pos_proj ``rel_indices.expand(B, ...)``: the shortcut (one row, expanded) must give the
    values and gradients of the full computation on a materialised batch, in single and grouped mode."""
    net = _net()
    layer = dict(net.backbone.model.named_modules())["blocks.0.attn.pos_proj"]
    route = net.adapters.route
    rel = torch.randn(1, 9, 9, 3)
    for mode, names, n in (("single", ["c"], 4), ("grouped", ["a", "b", "c"], 3 * 4)):
        route.mode, route.name, route.names = mode, names[0] if mode == "single" else None, names
        outs, grads = [], []
        for x in (rel.expand(n, -1, -1, -1), rel.expand(n, -1, -1, -1).contiguous()):
            for prm in net.adapters.parameters("c"):
                prm.grad = None
            y = layer(x)
            (y * torch.arange(y.numel()).view(y.shape).float().sin()).sum().backward()  # rows weighted differently
            outs.append(y.detach())
            grads.append([prm.grad.clone() for prm in net.adapters.parameters("c") if prm.grad is not None])
        assert outs[0].shape == (n, 9, 9, layer.base_layer.out_features)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        assert len(grads[0]) == len(grads[1]) > 0
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        if mode == "grouped":  # slice g went through adapter g
            assert (outs[0][0] - outs[0][n - 1]).abs().max() > 1e-4
    route.mode, route.name, route.names = "off", None, []
