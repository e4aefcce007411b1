"""Grouped one-pass forward beyond test_lorax_net: reused weight stacks stay correct, gradients, the parts (trunk,
branch, classify) composed from separate passes."""

from __future__ import annotations

import torch

from lorax.models.adapters import _add_low_rank
from lorax.models.backbone_factory import create_backbone
from lorax.models import lorax_net
from lorax.models.lorax_net import LoRAXNet, adapter_groups
from tests.helpers import tiny_params


def _net(**ov) -> LoRAXNet:
    p = tiny_params(**{"adapter__dropout": 0.0, **ov})
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
    """The parts composed as LoRAX's training steps compose them (trunk tokens and the frozen adapters' embeddings
    from separate passes, only the newest adapter run on the tokens) == the full forward."""
    net = _net(adapter__blocks="last_k", adapter__last_k=1).eval()
    assert net.branch_block == 1  # a real trunk below the adapted block
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        old = net.embeddings(x, ["a", "b"])
        tokens = net.trunk(x)
        composed = net.classify(torch.cat([old, net.branch(tokens, ["c"])], 0))
        full = net(x)
    torch.testing.assert_close(composed[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(composed[1], full[1], rtol=1e-5, atol=1e-5)


def test_batch_of_identical_rows_is_computed_once_with_the_same_result():
    """ConViT's GPSA feeds pos_proj ``rel_indices.expand(B, ...)``: the shortcut (one row, expanded) must give the
    values and gradients of the full computation on a materialised batch, in single and grouped mode."""
    net = _net()
    layer = dict(net.backbone.model.named_modules())["blocks.0.attn.pos_proj"]
    route = net.adapters.route
    rel = torch.randn(1, 9, 9, 3)
    for mode, names, n in (("single", ["c"], 4), ("grouped", ["a", "b", "c"], 3 * 4)):
        outs, grads = [], []
        with route.using(names[0]) if mode == "single" else route.using(names=names):
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
    assert route.mode == "off"  # the routing ends with its block


def test_adapter_groups_split_by_rows():
    assert adapter_groups(["a", "b", "c"], 100, None) == [["a", "b", "c"]]
    assert adapter_groups(["a", "b", "c"], 100, 300) == [["a", "b", "c"]]
    assert adapter_groups(["a", "b", "c", "d", "e"], 100, 250) == [["a", "b"], ["c", "d"], ["e"]]
    assert adapter_groups(["a", "b"], 100, 50) == [["a"], ["b"]]  # one adapter per group at least


def test_grouped_pass_split_into_groups_equals_the_loop(monkeypatch):
    """On CPU a large group runs in several smaller grouped passes (a group of one takes the single route): same
    embeddings as one group and as the loop, and every adapter really ran (no group dropped or repeated)."""
    net = _net().eval()
    x = torch.randn(3, 3, 16, 16)
    rows = net.trunk(x).shape[:-1].numel()
    with torch.inference_mode():
        seq = net.embeddings(x, one_pass=False)
        monkeypatch.setattr(lorax_net, "CPU_GROUP_ROWS", None)
        whole = net.embeddings(x, one_pass=True)
        monkeypatch.setattr(lorax_net, "CPU_GROUP_ROWS", 2 * rows)  # groups [a, b] and [c]
        split = net.embeddings(x, one_pass=True)
        monkeypatch.setattr(lorax_net, "CPU_GROUP_ROWS", rows)  # three single passes
        singles = net.embeddings(x, one_pass=True)
    for out in (whole, split, singles):
        torch.testing.assert_close(out, seq, rtol=1e-5, atol=1e-5)
    assert min((seq[i] - seq[j]).abs().max() for i, j in ((0, 1), (1, 2), (0, 2))) > 1e-4


def test_split_groups_training_gradients_equal_the_loop(monkeypatch):
    net = _net()
    net.train()
    x = torch.randn(3, 3, 16, 16)
    monkeypatch.setattr(lorax_net, "CPU_GROUP_ROWS", 2 * net.trunk(x).shape[:-1].numel())
    grads = []
    for one_pass in (True, False):
        for p in net.trainable_parameters():
            p.grad = None
        logits, div = net.classify(net.embeddings(x, one_pass=one_pass))
        (logits.square().mean() + div.square().mean()).backward()
        grads.append([p.grad.clone() for p in net.adapters.parameters("c")])
    assert all(g.abs().max() > 0 for g in grads[0][1::2])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_on_the_trained_adapter_only_same_as_the_loop(monkeypatch):
    """Training with adapter dropout: the grouped pass drops only the trained (last) adapter's input, with the same
    masks as its own pass in the loop (same RNG draws), so embeddings and its gradients match the loop; the frozen
    adapters stay deterministic."""
    net = _net(adapter__dropout=0.5)
    monkeypatch.setattr(lorax_net, "CPU_GROUP_ROWS", None)
    net.train()
    x = torch.randn(2, 3, 16, 16)
    outs, grads = [], []
    for one_pass in (True, False):
        for p in net.trainable_parameters():
            p.grad = None
        torch.manual_seed(7)
        emb = net.embeddings(x, one_pass=one_pass)
        emb.square().sum().backward()
        outs.append(emb.detach())
        grads.append([p.grad.clone() for p in net.adapters.parameters("c")])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    net.eval()
    with torch.no_grad():
        clean = net.embeddings(x)
    torch.testing.assert_close(outs[0][:2], clean[:2], rtol=1e-5, atol=1e-5)  # frozen adapters: no dropout
    assert (outs[0][2] - clean[2]).abs().max() > 1e-4  # the trained one was dropped out


def test_low_rank_add_in_place_only_without_autograd():
    """The base output takes the low-rank sum in place without autograd; with autograd a new tensor is returned and
    the gradient is that of ``result + scale * h @ b``."""
    result, h, b = torch.randn(2, 5, 6), torch.randn(2, 5, 3), torch.randn(2, 3, 6)
    want = result + 0.5 * torch.bmm(h, b)
    with torch.no_grad():
        r = result.clone()
        out = _add_low_rank(r, h, b, 0.5)
    assert out.data_ptr() == r.data_ptr()
    torch.testing.assert_close(out, want)
    hg = h.clone().requires_grad_(True)
    r = result.clone()
    out = _add_low_rank(r, hg, b, 0.5)
    torch.testing.assert_close(r, result)  # untouched
    torch.testing.assert_close(out, want)
    out.sum().backward()
    torch.testing.assert_close(hg.grad, 0.5 * b.sum(-1).unsqueeze(1).expand(2, 5, 3))
    flat = _add_low_rank(result.reshape(10, 6).clone(), h.reshape(10, 3), b[0], 2.0)  # single route: addmm
    torch.testing.assert_close(flat, result.reshape(10, 6) + 2.0 * h.reshape(10, 3) @ b[0])
