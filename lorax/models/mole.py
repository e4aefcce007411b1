"""Mixture of low-rank experts (CLIP-MoLE, Liu et al. 2024) around frozen linear layers.

Each wrapped linear ``W0`` gets a shared LoRA that is always on and ``N`` separate LoRAs of their own ranks behind a
linear router ``W_g`` (N x in). Per token the router's softmax picks the top-1 expert, whose output is weighted by
its gate value so that the router receives gradients::

    h = W0 x + (a/r) B A x + G_k(x) (a_k/r_k) B_k A_k x,    k = argmax_i softmax(W_g x)_i

Every layer also keeps the load-balancing loss of its last forward, ``N * sum_j f_j P_j`` (f_j = share of tokens
routed to expert j, P_j = mean gate probability of j); it is 1 under perfectly uniform routing and reaches N when
one expert takes every token with certainty. ``shared_rank=0`` gives the "separate experts only" variant,
``expert_ranks=[]`` the "shared LoRA only" one (a plain LoRA).

Scaling: ``alpha=None`` makes every LoRA's factor a/r equal to 1 (alpha_i = r_i, the paper gives no alpha); a number
uses that alpha for all of them, so higher-rank experts get smaller factors. B matrices start at zero (the wrapped
model starts equal to the frozen one), A matrices and the router like ``nn.Linear``.

Top-1 dispatch has two equivalent implementations (``dispatch``):

* ``dense``: all A matrices are concatenated so every token goes through one ``x @ A_cat^T`` and one
  ``h @ B_cat^T``; the columns of experts a token was not routed to are multiplied by zero. Experts that got no
  token receive an all-zero gradient.
* ``sparse``: tokens are sorted by expert, each expert computes only its own slice (two small matmuls), and one
  inverse gather restores the order. Experts that got no token receive no gradient (``None``).

With the paper's small ranks (8 + 4/8/16) the dense form does at most 28 needless rank-columns of work per token
but saves the gathers and scatters, and it wins on CPU (:func:`benchmark_dispatch`, one thread, forward+backward of
the low-rank part, median ms, dense / sparse): ViT-B/32 ``c_fc`` at batch 32 (1600 tokens, 768->3072) 135 / 373,
``c_proj`` (3072->768) 84 / 120, ViT-L/14 ``c_fc`` at batch 32 (8224 tokens, 1024->4096) 1620 / 5130, 256 tokens
29 / 41; forward only 2-5x. ``dense`` is therefore the default (``DEFAULT_DISPATCH``).

Attention (for the ablation): timm blocks call ``attn.qkv``/``attn.proj`` (``qk``/``v`` in ConViT's GPSA) as modules,
so those linears are wrapped directly. open_clip blocks use ``nn.MultiheadAttention``, which reads its packed
``in_proj_weight`` and never calls ``out_proj.forward``; it is replaced by :class:`MoLEMultiheadAttention`, a
self-attention-only equivalent whose ``in_proj`` (q, k and v together, one router) and ``out_proj`` are MoLE layers
over the same frozen weights. ConViT's ``pos_proj`` (3 -> heads, positional) is never wrapped.

(Over 350 lines: ~400, 40 of them this docstring.) Why one file: it is one mechanism, the MoLE linear, the attention module
made of MoLE linears, and the small functions that apply, collect, save and time them; the design notes above
cover all of it. ``mole_adapters`` (LoRAX's MoLE adapter set) builds on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DEFAULT_DISPATCH",
    "MoLELinear",
    "MoLEMultiheadAttention",
    "apply_mole",
    "balance_loss",
    "mole_layers",
    "mole_state_dict",
]

DEFAULT_DISPATCH = "dense"


def _lora_pair(in_features: int, out_features: int, r: int) -> tuple[nn.Parameter, nn.Parameter]:
    a = torch.empty(r, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft / nn.Linear
    return nn.Parameter(a), nn.Parameter(torch.zeros(out_features, r))


class MoLELinear(nn.Module):
    """A frozen ``nn.Linear`` plus a shared LoRA and a top-1 routed mixture of LoRA experts.

    Args:
        base: the linear layer to adapt; its parameters are frozen (``requires_grad=False``) and never copied.
        shared_rank: rank of the always-on shared LoRA; 0 = none (separate experts only).
        expert_ranks: ranks of the separate experts, one per expert; empty = none (shared LoRA only).
        alpha: LoRA alpha for every LoRA; ``None`` = each LoRA's own rank (factor 1).
        dispatch: ``dense`` or ``sparse`` top-1 computation (same result, see the module docstring).
    """

    def __init__(
        self,
        base: nn.Linear,
        shared_rank: int = 8,
        expert_ranks: Sequence[int] = (4, 8, 16),
        alpha: float | None = None,
        dispatch: str = DEFAULT_DISPATCH,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MoLELinear wraps an nn.Linear, got {type(base).__name__}")
        expert_ranks = [int(r) for r in expert_ranks]
        if shared_rank < 0 or any(r < 1 for r in expert_ranks):
            raise ValueError(
                f"detect.shared_rank must be >= 0 and every detect.expert_ranks entry >= 1; "
                f"got shared_rank={shared_rank}, expert_ranks={expert_ranks}"
            )
        if shared_rank == 0 and not expert_ranks:
            raise ValueError("MoLE layer with neither a shared LoRA nor experts: set detect.shared_rank > 0 "
                             "or give detect.expert_ranks")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0 (or None for factor 1), got {alpha}")
        if dispatch not in ("dense", "sparse"):
            raise ValueError(f"dispatch must be 'dense' or 'sparse', got {dispatch!r}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.shared_rank, self.expert_ranks = int(shared_rank), expert_ranks
        self.alpha, self.dispatch = alpha, dispatch
        dev, dt = base.weight.device, base.weight.dtype

        def scale(r: int) -> float:
            return 1.0 if alpha is None else float(alpha) / r

        if shared_rank:
            self.shared_A, self.shared_B = _lora_pair(self.in_features, self.out_features, shared_rank)
        self.shared_scale = scale(shared_rank) if shared_rank else 0.0
        self.expert_A = nn.ParameterList()
        self.expert_B = nn.ParameterList()
        for r in expert_ranks:
            a, b = _lora_pair(self.in_features, self.out_features, r)
            self.expert_A.append(a)
            self.expert_B.append(b)
        self.expert_scales = [scale(r) for r in expert_ranks]
        self.router = nn.Linear(self.in_features, len(expert_ranks), bias=False) if expert_ranks else None
        # column -> expert index, for the dense form
        cols = torch.cat([torch.full((r,), i, dtype=torch.long) for i, r in enumerate(expert_ranks)]) \
            if expert_ranks else torch.zeros(0, dtype=torch.long)
        self.register_buffer("_col_expert", cols, persistent=False)
        self.to(device=dev, dtype=dt)
        self.balance_loss: torch.Tensor | None = None  # of the last forward
        self.last_counts: torch.Tensor | None = None  # tokens per expert in the last forward (detached)

    @property
    def num_experts(self) -> int:
        return len(self.expert_ranks)

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects ``.weight`` of a linear (dtype, device, shape)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, shared_rank={self.shared_rank}, "
                f"expert_ranks={self.expert_ranks}, alpha={self.alpha}, dispatch={self.dispatch}")

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (T, in) -> gate probabilities (T, N) in float32, top-1 index (T,), its gate value (T,)."""
        probs = self.router(x2).float().softmax(-1)
        gate, top1 = probs.max(-1)
        return probs, top1, gate

    def _balance(self, probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
        n = self.num_experts
        counts = torch.bincount(top1, minlength=n)
        self.last_counts = counts.detach()
        f = counts.to(probs.dtype) / max(top1.numel(), 1)
        return n * (f * probs.mean(0)).sum()

    def delta(self, x2: torch.Tensor) -> torch.Tensor:
        """The low-rank update for tokens (T, in) -> (T, out); also sets ``balance_loss``."""
        dt = x2.dtype
        if not self.num_experts:
            self.balance_loss = x2.new_zeros((), dtype=torch.float32)
            return (x2 @ self.shared_A.to(dt).t()) @ self.shared_B.to(dt).t() * self.shared_scale
        probs, top1, gate = self.route(x2)
        self.balance_loss = self._balance(probs, top1) if x2.shape[0] else probs.sum() * 0
        if self.dispatch == "dense":
            return self._dense(x2, top1, gate)
        return self._sparse(x2, top1, gate)

    def _dense(self, x2: torch.Tensor, top1: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dt = x2.dtype
        scales = torch.tensor(self.expert_scales, dtype=torch.float32, device=x2.device)
        w = F.one_hot(top1, self.num_experts).float() * (gate * scales[top1]).unsqueeze(1)  # (T, N)
        col_w = w[:, self._col_expert]  # (T, sum r_i)
        a = list(self.expert_A)
        b = list(self.expert_B)
        if self.shared_rank:
            a.insert(0, self.shared_A)
            b.insert(0, self.shared_B)
            col_w = torch.cat([col_w.new_full((col_w.shape[0], self.shared_rank), self.shared_scale), col_w], 1)
        h = x2 @ torch.cat(a, 0).to(dt).t()
        return (h * col_w.to(dt)) @ torch.cat(b, 1).to(dt).t()

    def _sparse(self, x2: torch.Tensor, top1: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dt = x2.dtype
        if self.shared_rank:
            out = (x2 @ self.shared_A.to(dt).t()) @ self.shared_B.to(dt).t() * self.shared_scale
        else:
            out = x2.new_zeros(x2.shape[0], self.out_features)
        order = torch.argsort(top1, stable=True)
        counts = torch.bincount(top1, minlength=self.num_experts).tolist()
        xs = x2.index_select(0, order) * (gate.index_select(0, order)).to(dt).unsqueeze(1)  # sorted by expert
        parts, start = [], 0
        for i, n in enumerate(counts):
            if n:
                xi = xs[start:start + n]
                parts.append((xi @ self.expert_A[i].to(dt).t()) @ self.expert_B[i].to(dt).t() * self.expert_scales[i])
            start += n
        if not parts:  # no tokens
            return out
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out + torch.cat(parts, 0).index_select(0, inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        d = self.delta(x.reshape(-1, self.in_features))
        return y + d.reshape(y.shape).to(y.dtype)


class MoLEMultiheadAttention(nn.Module):
    """Self-attention equivalent of an ``nn.MultiheadAttention`` whose in/out projections are :class:`MoLELinear`.

    ``nn.MultiheadAttention`` computes its projections from ``in_proj_weight`` inside a functional call and never
    calls ``out_proj.forward``, so its linears cannot be wrapped in place. This module shares the same frozen
    parameters and reproduces its forward (batch_first or not, additive or boolean ``attn_mask``) for the case the
    CLIP vision tower uses: query, key and value are the same tensor, ``need_weights=False``, no padding mask.
    """

    def __init__(self, mha: nn.MultiheadAttention, wrap: Callable[[nn.Linear], MoLELinear]) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("MoLEMultiheadAttention supports MultiheadAttention with packed in_proj, "
                             "no bias_k/bias_v and no add_zero_attn (the CLIP vision tower's form)")
        e = mha.embed_dim
        in_proj = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None, device=mha.in_proj_weight.device,
                            dtype=mha.in_proj_weight.dtype)
        in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            in_proj.bias = mha.in_proj_bias
        self.in_proj = wrap(in_proj)
        self.out_proj = wrap(mha.out_proj)
        self.embed_dim, self.num_heads = e, mha.num_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("MoLEMultiheadAttention: self-attention only (key and value must be query)")
        if need_weights or key_padding_mask is not None:
            raise NotImplementedError("MoLEMultiheadAttention: need_weights and key_padding_mask are not supported")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, e = x.shape
        h = self.num_heads
        q, k, v = self.in_proj(x).reshape(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:  # MHA: True = masked out; SDPA: True = attend
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        if mask is not None and mask.dim() == 3:  # (B*H, L, S) -> (B, H, L, S)
            mask = mask.reshape(b, h, *mask.shape[-2:])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        o = self.out_proj(o.transpose(1, 2).reshape(b, n, e))
        return (o if self.batch_first else o.transpose(0, 1)), None


def _target_blocks(n_blocks: int, blocks: int | Sequence[int]) -> list[int]:
    if isinstance(blocks, int):
        if blocks < 0 or blocks > n_blocks:
            raise ValueError(f"detect.blocks: {blocks} is not in 0..{n_blocks} (last k blocks; 0 = all "
                             f"{n_blocks} blocks of this backbone)")
        return list(range(n_blocks - (blocks or n_blocks), n_blocks))
    idx = sorted({int(i) for i in blocks})
    bad = [i for i in idx if not 0 <= i < n_blocks]
    if bad:
        raise ValueError(f"blocks {bad} do not exist; the backbone has blocks 0..{n_blocks - 1}")
    return idx


def _linear_children(module: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    return [n for n, m in module.named_children() if isinstance(m, nn.Linear) and n not in set(skip)]


def apply_mole(
    backbone: nn.Module,
    blocks: int | Sequence[int] = 3,
    where: str = "mlp",
    shared_rank: int = 8,
    expert_ranks: Sequence[int] = (4, 8, 16),
    alpha: float | None = None,
    dispatch: str = DEFAULT_DISPATCH,
) -> dict[str, MoLELinear]:
    """Wrap the MLP (and/or attention) linears of some blocks of a :class:`~lorax.models.backbones.Backbone` in place.

    ``blocks``: the last k blocks (0 = all), or explicit block indices. ``where``: ``mlp`` | ``attn`` | ``both``.
    Works on timm ViT/ConViT blocks (``mlp.fc1/fc2``, ``attn.qkv|qk|v|proj``) and open_clip residual blocks
    (``mlp.c_fc/c_proj``; attention through :class:`MoLEMultiheadAttention`). The backbone stays frozen; only the
    new LoRA and router parameters require gradients. Returns ``{qualified name in backbone.model: layer}``.
    """
    if where not in ("mlp", "attn", "both"):
        raise ValueError(f"detect.where: {where!r}; allowed: mlp, attn, both")
    if any(isinstance(m, MoLELinear) for m in backbone.modules()):
        raise ValueError("backbone already holds MoLE layers; build a fresh backbone before applying MoLE again")
    for p in backbone.parameters():
        p.requires_grad_(False)

    def wrap(lin: nn.Linear) -> MoLELinear:
        return MoLELinear(lin, shared_rank, expert_ranks, alpha=alpha, dispatch=dispatch)

    out: dict[str, MoLELinear] = {}
    for i in _target_blocks(len(backbone.blocks), blocks):
        block = backbone.blocks[i]
        prefix = backbone.block_prefix(i)
        if where in ("mlp", "both"):
            mlp = getattr(block, "mlp", None)
            names = _linear_children(mlp) if mlp is not None else []
            if not names:
                raise ValueError(f"block {prefix!r} has no mlp linears to adapt ({type(block).__name__})")
            for n in names:
                layer = wrap(getattr(mlp, n))
                setattr(mlp, n, layer)
                out[f"{prefix}mlp.{n}"] = layer
        if where in ("attn", "both"):
            attn = getattr(block, "attn", None)
            if isinstance(attn, nn.MultiheadAttention):
                new = MoLEMultiheadAttention(attn, wrap)
                block.attn = new
                out[f"{prefix}attn.in_proj"] = new.in_proj
                out[f"{prefix}attn.out_proj"] = new.out_proj
                continue
            names = _linear_children(attn, skip=("pos_proj",)) if attn is not None else []
            if not names:
                raise ValueError(f"block {prefix!r} has no attention linears to adapt ({type(attn).__name__})")
            for n in names:
                layer = wrap(getattr(attn, n))
                setattr(attn, n, layer)
                out[f"{prefix}attn.{n}"] = layer
    return out


def mole_layers(module: nn.Module) -> dict[str, MoLELinear]:
    """All MoLE layers inside ``module`` by qualified name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, MoLELinear)}


def balance_loss(layers: Mapping[str, MoLELinear] | Iterable[MoLELinear]) -> torch.Tensor:
    """Sum of the layers' load-balancing losses from their last forward (0 for layers without experts)."""
    layers = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    total: torch.Tensor | None = None
    for layer in layers:
        if layer.num_experts == 0:
            continue
        if layer.balance_loss is None:
            raise RuntimeError("balance_loss: a MoLE layer has not run a forward yet; call the model first")
        total = layer.balance_loss if total is None else total + layer.balance_loss
    if total is None:
        p = next((p for layer in layers for p in layer.parameters()), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


def mole_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable MoLE tensors (LoRA A/B, routers) of ``module``, by qualified name; the frozen bases excluded."""
    out = {}
    for name, layer in mole_layers(module).items():
        for pname, p in layer.named_parameters():
            if not pname.startswith("base."):
                out[f"{name}.{pname}"] = p.detach()
    return out


def benchmark_dispatch(
    tokens: int = 1600,
    in_features: int = 768,
    out_features: int = 3072,
    shared_rank: int = 8,
    expert_ranks: Sequence[int] = (4, 8, 16),
    repeats: int = 5,
    backward: bool = True,
) -> dict[str, float]:
    """Median seconds of the low-rank part (``delta``: routing, LoRAs, balance loss), forward (+ backward), for
    each dispatch. Defaults: one ViT-B/32 ``c_fc`` at batch 32 (32 x 50 tokens)."""
    import time

    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features)
    x = torch.randn(tokens, in_features)
    out = {}
    for dispatch in ("dense", "sparse"):
        layer = MoLELinear(base, shared_rank, expert_ranks, dispatch=dispatch)
        for b in [*layer.expert_B] + ([layer.shared_B] if shared_rank else []):
            nn.init.normal_(b, std=0.02)
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            d = layer.delta(x)
            if backward:
                (d.square().mean() + layer.balance_loss).backward()
            times.append(time.perf_counter() - t)
        out[dispatch] = sorted(times[1:])[len(times[1:]) // 2]
    return out
