"""MoLE layer: routing, gate weighting, balance loss, gradient flow, frozen backbone, zero-init equivalence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorax.models.config import ModelConfig
from lorax.models.backbone_factory import create_backbone
from lorax.models.mole import MoLELinear, MoLEMultiheadAttention, apply_mole, balance_loss, mole_state_dict

DISPATCH = ["dense", "sparse"]

TINY = {
    "vit": ModelConfig(backbone="vit_tiny_patch16_224", img_size=16, pretrained=None,
                       kwargs={"depth": 4, "patch_size": 8, "embed_dim": 32, "num_heads": 2}),
    "convit": ModelConfig(backbone="convit_tiny", img_size=16, pretrained=None,
                          kwargs={"depth": 4, "local_up_to_layer": 2, "patch_size": 8, "num_heads": 2,
                                  "embed_dim": 32}),
    "clip": ModelConfig(backbone="open_clip:ViT-B-32", img_size=16, pretrained=None,
                        kwargs={"layers": 4, "width": 32, "head_width": 16, "patch_size": 8}),
}


def _set(p: nn.Parameter, value) -> None:
    with torch.no_grad():
        p.copy_(torch.as_tensor(value, dtype=p.dtype))


def _hand_layer(dispatch: str, shared: bool = False, alpha: float | None = None) -> MoLELinear:
    """in=out=2; expert 0 keeps x0, expert 1 keeps x1; router logits = x (expert i wins where x_i is largest)."""
    base = nn.Linear(2, 2, bias=False)
    _set(base.weight, torch.zeros(2, 2))
    layer = MoLELinear(base, shared_rank=1 if shared else 0, expert_ranks=[1, 1], alpha=alpha, dispatch=dispatch)
    _set(layer.expert_A[0], [[1.0, 0.0]])
    _set(layer.expert_B[0], [[1.0], [0.0]])
    _set(layer.expert_A[1], [[0.0, 1.0]])
    _set(layer.expert_B[1], [[0.0], [1.0]])
    _set(layer.router.weight, torch.eye(2))
    if shared:
        _set(layer.shared_A, [[1.0, 1.0]])
        _set(layer.shared_B, [[1.0], [-1.0]])
    return layer


@pytest.mark.parametrize("dispatch", DISPATCH)
def test_top1_choice_and_gate_weighting(dispatch: str) -> None:
    layer = _hand_layer(dispatch)
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.5]])
    y = layer(x)
    g0 = math.exp(2) / (math.exp(2) + 1)  # softmax(2, 0)[0]
    g1 = math.exp(3) / (math.exp(3) + 1)  # softmax(0, 3)[1]
    g2 = math.exp(1) / (math.exp(1) + math.exp(0.5))  # softmax(1, 0.5)[0]
    want = torch.tensor([[2 * g0, 0.0], [0.0, 3 * g1], [1 * g2, 0.0]])  # only the top-1 expert's output, gated
    torch.testing.assert_close(y, want)
    assert layer.last_counts.tolist() == [2, 1]


@pytest.mark.parametrize("dispatch", DISPATCH)
def test_shared_lora_always_on_and_alpha_scaling(dispatch: str) -> None:
    layer = _hand_layer(dispatch, shared=True, alpha=3.0)  # every LoRA has rank 1 -> factor 3
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    g0 = math.exp(2) / (math.exp(2) + 1)
    g1 = math.exp(3) / (math.exp(3) + 1)
    shared = torch.tensor([[2.0, -2.0], [3.0, -3.0]]) * 3
    experts = torch.tensor([[2 * g0, 0.0], [0.0, 3 * g1]]) * 3
    torch.testing.assert_close(layer(x), shared + experts)


def test_balance_loss_is_one_under_uniform_routing() -> None:
    layer = MoLELinear(nn.Linear(8, 4), shared_rank=2, expert_ranks=[4, 8, 16])
    nn.init.zeros_(layer.router.weight)  # every gate probability is exactly 1/N
    layer(torch.randn(5, 7, 8))
    assert layer.balance_loss.item() == pytest.approx(1.0, abs=1e-6)
    # evenly split tokens with mirrored probabilities: f = P = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1
    two = _hand_layer("dense")
    two(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert two.balance_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_collapsed_routing_reaches_n() -> None:
    layer = MoLELinear(nn.Linear(4, 4), shared_rank=0, expert_ranks=[2, 2, 2])
    _set(layer.router.weight, torch.tensor([[0, 0, 0, 100.0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.zeros(6, 4)
    x[:, 3] = 1.0  # every token goes to expert 0 with probability ~1
    layer(x)
    assert layer.last_counts.tolist() == [6, 0, 0]
    assert layer.balance_loss.item() == pytest.approx(3.0, rel=1e-4)
    assert balance_loss({"a": layer, "b": layer}).item() == pytest.approx(6.0, rel=1e-4)


@pytest.mark.parametrize("dispatch", DISPATCH)
def test_gradients_reach_router_shared_and_chosen_experts_only(dispatch: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = MoLELinear(base, shared_rank=2, expert_ranks=[2, 3, 4], dispatch=dispatch)
    for b in [layer.shared_B, *layer.expert_B]:
        nn.init.normal_(b)
    v = torch.randn(6)
    _set(layer.router.weight, torch.stack([v, -v, torch.zeros(6)]))  # expert 2 never wins (logit 0 < |v.x|)
    x = torch.randn(16, 6)
    layer(x).pow(2).sum().backward()  # no balance term: the router's gradient comes through the gate weights
    counts = layer.last_counts.tolist()
    assert counts[2] == 0 and counts[0] > 0 and counts[1] > 0
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    for p in (layer.shared_A, layer.shared_B, *layer.expert_A[:2], *layer.expert_B[:2]):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in (layer.expert_A[2], layer.expert_B[2]):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert base.weight.grad is None and base.bias.grad is None


def test_dense_and_sparse_dispatch_agree() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(12, 10)
    layers = [MoLELinear(lin, 4, [2, 4, 8], dispatch=d) for d in DISPATCH]
    layers[1].load_state_dict(layers[0].state_dict())
    for b in [layers[0].shared_B, *layers[0].expert_B]:
        nn.init.normal_(b)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 9, 12)
    outs = []
    for layer in layers:
        y = layer(x)
        (y.square().mean() + 0.1 * layer.balance_loss).backward()
        outs.append((y, layer.balance_loss, layer.router.weight.grad, layer.expert_A[1].grad, layer.shared_B.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_variants_shared_only_and_separate_only() -> None:
    lin = nn.Linear(4, 3)
    shared = MoLELinear(lin, shared_rank=8, expert_ranks=[])
    assert shared.router is None and len(shared.expert_A) == 0
    shared(torch.randn(2, 4))
    assert balance_loss([shared]).item() == 0.0
    separate = MoLELinear(lin, shared_rank=0, expert_ranks=[4, 8])
    assert not hasattr(separate, "shared_A") and separate.router.weight.shape == (2, 4)
    with pytest.raises(ValueError, match="shared_rank"):
        MoLELinear(lin, shared_rank=0, expert_ranks=[])
    with pytest.raises(ValueError, match="expert_ranks"):
        MoLELinear(lin, shared_rank=4, expert_ranks=[4, 0])


@pytest.mark.parametrize("family", sorted(TINY))
def test_zero_init_equals_frozen_model_and_wrapping_is_live(family: str) -> None:
    bb = create_backbone(TINY[family])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = bb(x)
    layers = apply_mole(bb, blocks=2, where="both")
    prefixes = [bb.block_prefix(2), bb.block_prefix(3)]
    assert all(any(n.startswith(p) for p in prefixes) for n in layers)
    assert any(".mlp." in n for n in layers) and any(".attn." in n for n in layers)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref, rtol=1e-5, atol=1e-5)
        for name, layer in layers.items():  # every wrapped layer is really on the forward path
            nn.init.normal_(layer.shared_B, std=0.5)
            assert not torch.allclose(bb(x), ref, atol=1e-4), f"{name} is not used by the forward"
            nn.init.zeros_(layer.shared_B)
    assert all(layer.balance_loss is not None for layer in layers.values())


def test_open_clip_attention_wrapper_matches_multihead_attention() -> None:
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        wrapped = MoLEMultiheadAttention(mha, lambda lin: MoLELinear(lin, 2, [2, 2])).eval()
        x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)  # sequence length 5
        mask = torch.randn(5, 5)
        for m in (None, mask, mask > 0.5):
            want = mha(x, x, x, need_weights=False, attn_mask=m)[0]
            torch.testing.assert_close(wrapped(x, x, x, need_weights=False, attn_mask=m)[0], want,
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="self-attention"):
        wrapped(x, x.clone(), x)


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_backbone_never_changes_after_optimizer_step(family: str) -> None:
    bb = create_backbone(TINY[family])
    frozen = [(p, p.detach().clone()) for p in bb.parameters()]  # wrapping keeps these very tensors
    layers = apply_mole(bb, blocks=2, where="both")
    head = nn.Linear(bb.embed_dim, 1)
    trainable = [p for p in bb.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for layer in layers.values() for q in layer.parameters()) for p in trainable)
    opt = torch.optim.AdamW(list(bb.parameters()) + list(head.parameters()), lr=1e-2, weight_decay=0.1)
    before = {k: v.clone() for k, v in mole_state_dict(bb).items()}
    for _ in range(2):
        loss = head(bb(torch.randn(4, 3, 16, 16))).sum() + 0.01 * balance_loss(layers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, value in frozen:
        assert p.grad is None and torch.equal(p, value)
    changed = [k for k, v in mole_state_dict(bb).items() if not torch.equal(v, before[k])]
    assert changed, "no MoLE parameter moved"


def test_apply_mole_block_selection_and_errors() -> None:
    bb = create_backbone(TINY["vit"])
    with pytest.raises(ValueError, match="detect.blocks"):
        apply_mole(bb, blocks=5)
    with pytest.raises(ValueError, match="detect.where"):
        apply_mole(bb, where="ffn")
    layers = apply_mole(bb, blocks=0, where="mlp")
    assert sorted(layers) == sorted(f"blocks.{i}.mlp.{n}" for i in range(4) for n in ("fc1", "fc2"))
    with pytest.raises(ValueError, match="already holds MoLE"):
        apply_mole(bb, blocks=1)
    convit = create_backbone(TINY["convit"])
    names = apply_mole(convit, blocks=4, where="attn")
    assert not any("pos_proj" in n for n in names) and "blocks.0.attn.qk" in names and "blocks.3.attn.qkv" in names
