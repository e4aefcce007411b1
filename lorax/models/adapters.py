"""Per-task LoRA adapters on a frozen backbone: peft creates them, we route the forward.

peft's ``LoraConfig`` and ``inject_adapter_in_model`` create the adapter weights (its module matching, its init,
its naming). Its forward applies the *active* adapter(s) to the whole batch, which forces LoRAX's published loop
(set adapter, full forward, repeat). We replace the forward of every LoRA layer with one that reads a shared
:class:`Route`:

* ``single``: one named adapter for the whole batch (the sequential reference; also used for one task's pass);
* ``grouped``: the batch holds G copies of the images, slice g goes through adapter ``names[g]``; all slices are
  computed with two batched matmuls (``bmm``, then ``baddbmm`` accumulating onto the frozen output), so every
  adapter's embedding comes out of one pass.

Dropout acts only on the adapter being trained (the last name of the group, in training mode): frozen adapters are
deterministic, which is also what makes their embeddings cacheable.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from lorax.config import AdapterConfig


@dataclass
class Route:
    """Which adapter(s) the adapted layers apply, shared by every layer of one backbone. Set it only through
    :meth:`using`, so a forward that raises never leaves the backbone routed."""

    mode: str = "off"  # off | single | grouped
    name: str | None = None
    names: list[str] = field(default_factory=list)
    train_name: str | None = None  # the adapter whose dropout is active while training
    dropout: bool = False  # training mode: dropout on ``train_name``'s input

    @contextmanager
    def using(self, name: str | None = None, names: list[str] | None = None) -> Iterator[Route]:
        """Within the block, apply adapter ``name`` to the whole batch, or (``names``) slice g of the batch through
        ``names[g]``; the previous routing is restored on exit, also on an error."""
        if (name is None) == (names is None):
            raise ValueError("Route.using: give one adapter name or a group of names")
        before = (self.mode, self.name, self.names)
        self.mode, self.name, self.names = ("single", name, []) if names is None else ("grouped", None, list(names))
        try:
            yield self
        finally:
            self.mode, self.name, self.names = before


def _p(layer: LoraLinear, name: str) -> float:
    drop = layer.lora_dropout[name]
    return getattr(drop, "p", 0.0)


def _stacked(layer: LoraLinear, names: list[str], a_dtype: torch.dtype, b_dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's A^T (G, in, r) and scaling * B^T (G, r, out), in the dtypes of the input and the output.

    The scaling is folded into B, so the low-rank product adds onto the base output in one kernel (no separate
    multiply and add over G x tokens x out). Stacking copies every adapter's weights on every call; when no weight
    of the group needs a gradient (inference, exemplar features, the feature cache) the stack is kept on the layer
    and reused until a weight changes (its version counter moves: optimizer steps, ``load_state_dict``).
    """
    wa = [layer.lora_A[n].weight for n in names]
    wb = [layer.lora_B[n].weight for n in names]
    scales = [layer.scaling[n] for n in names]

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.stack(wa).transpose(1, 2).to(a_dtype)
        b = torch.stack(wb).transpose(1, 2)
        if len(set(scales)) == 1:
            b = b * scales[0]
        else:
            b = b * torch.tensor(scales, dtype=b.dtype, device=b.device).view(-1, 1, 1)
        return a, b.to(b_dtype)

    if torch.is_grad_enabled() and any(w.requires_grad for w in wa + wb):
        return build()
    key = (tuple(names), a_dtype, b_dtype, torch.is_inference_mode_enabled(),
           tuple((w.data_ptr(), w._version) for w in wa + wb))
    cached = layer.__dict__.get("_lorax_stacked")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            a, b = build()
        cached = (key, a.contiguous(), b.contiguous())
        layer.__dict__["_lorax_stacked"] = cached
    return cached[1], cached[2]


def _dropout_on(layer: LoraLinear, route: Route) -> bool:
    """Whether this call applies dropout (training, and the trained adapter is the one / the last of the group)."""
    name = route.name if route.mode == "single" else (route.names[-1] if route.names else None)
    return bool(route.dropout and name is not None and name == route.train_name and name in layer.lora_A
                and _p(layer, name))


def _add_low_rank(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``result + scale * h @ b`` as one GEMM that accumulates onto the frozen base output.

    ``h`` (G, T, r) and ``b`` (G, r, out) go through ``baddbmm``; 2-D ones through ``addmm``. The base output is
    fresh and its producer (the frozen Linear) does not keep it for backward, so without autograd the sum is written
    into it in place; with autograd the out-of-place kernel is used (one read of ``result``, one write).
    """
    out_features = result.shape[-1]
    h = h.to(result.dtype)
    b = b.to(result.dtype)
    batched = h.dim() == 3
    flat = result.view(h.shape[0], -1, out_features) if batched else result.view(-1, out_features)
    if not (torch.is_grad_enabled() and (result.requires_grad or h.requires_grad or b.requires_grad)):
        (flat.baddbmm_ if batched else flat.addmm_)(h, b, alpha=scale)
        return result
    return (torch.baddbmm if batched else torch.addmm)(flat, h, b, alpha=scale).view(result.shape)


def _routed_forward(layer: LoraLinear, route: Route):
    def routed(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        if route.mode == "single":
            name = route.name
            if name is None or name not in layer.lora_A:
                return result
            h = x
            if route.dropout and name == route.train_name:
                h = nn.functional.dropout(h, layer.lora_dropout[name].p, True) if _p(layer, name) else h
            a = layer.lora_A[name](h)
            return _add_low_rank(result.contiguous(), a.reshape(-1, a.shape[-1]), layer.lora_B[name].weight.t(),
                                 layer.scaling[name])
        if route.mode == "grouped":
            names = route.names
            g = len(names)
            xs = x.reshape(g, -1, x.shape[-1])
            a, b = _stacked(layer, names, xs.dtype, result.dtype)  # (G, in, r), scaling * B^T (G, r, out)
            if route.dropout and route.train_name == names[-1] and _p(layer, names[-1]):
                # dropout on the trained adapter's slice only: its low-rank input is computed apart (no copy of
                # the whole group's tokens)
                p = layer.lora_dropout[names[-1]].p
                last = nn.functional.dropout(xs[-1:], p, True) @ a[-1:]
                h = torch.cat([torch.bmm(xs[:-1], a[:-1]), last], 0) if g > 1 else last
            else:
                h = torch.bmm(xs, a)  # (G, T, r)
            return _add_low_rank(result.contiguous(), h, b)
        return result

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # A batch of identical rows (ConViT's GPSA feeds pos_proj ``rel_indices.expand(B, N, N, 3)``): compute one
        # row per adapter and expand, instead of B copies of a B x N^2 x r LoRA product (which, stacked G times
        # in a grouped pass, no longer fits any cache). Not with dropout, whose masks differ per row.
        n = x.shape[0] if x.dim() > 2 else 0
        if n < 2 or x.stride(0) != 0 or _dropout_on(layer, route):
            return routed(x, *args, **kwargs)
        if route.mode != "grouped":
            one = routed(x[:1], *args, **kwargs)
            return one.expand(n, *one.shape[1:])
        g = len(route.names)
        one = x[:1].expand(g, *x.shape[1:])  # a group of G identical rows: one per adapter
        out = routed(one, *args, **kwargs)  # (G, ...): row g through adapter g
        return out.unsqueeze(1).expand(g, n // g, *out.shape[1:]).reshape(n, *out.shape[1:])

    return forward


def adapted_module_names(model: nn.Module, pattern: str, block_prefixes: list[str] | None = None) -> list[str]:
    """Names of the Linear modules an adapter will wrap (regex full-match, optionally within some blocks)."""
    rx = re.compile(pattern)
    names = []
    for name, mod in model.named_modules():
        base = mod.base_layer if isinstance(mod, LoraLinear) else mod
        if not isinstance(base, nn.Linear) or not rx.fullmatch(name):
            continue
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        if block_prefixes is not None and not any(name.startswith(p) for p in block_prefixes):
            continue
        names.append(name)
    return names


def required_targets(model: nn.Module, cfg: AdapterConfig, block_prefixes: list[str] | None = None) -> list[str]:
    """``adapted_module_names`` that must match something: else an error listing the backbone's Linears."""
    targets = adapted_module_names(model, cfg.target_modules, block_prefixes)
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"adapter.target_modules: {cfg.target_modules!r} matches no Linear module"
            + (f" in blocks {block_prefixes}" if block_prefixes else "")
            + f"; Linear modules of this backbone: {linears[:40]}{' ...' if len(linears) > 40 else ''}"
        )
    return targets


class AdapterSet:
    """What every kind of per-task adapter set shares (:class:`LoraAdapterSet`, and
    :class:`~lorax.models.mole_adapters.MoleAdapterSet`), so the network and the trainer need not know the kind:
    the frozen model, one :class:`Route` for all its adapted layers, the adapter names and the target Linears."""

    def __init__(self, model: nn.Module, cfg: AdapterConfig, block_prefixes: list[str] | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.route = Route()
        self.names: list[str] = []
        self.targets = required_targets(model, cfg, block_prefixes)

    def parameters(self, name: str) -> list[nn.Parameter]:
        """Adapter ``name``'s trainable tensors (each kind keeps them differently)."""
        raise NotImplementedError

    def set_trainable(self, name: str | None) -> None:
        """Freeze everything in the model except adapter ``name`` (None freezes all)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        if name is not None:
            for p in self.parameters(name):
                p.requires_grad_(True)
        self.route.train_name = name

    def n_params(self, name: str) -> int:
        return sum(p.numel() for p in self.parameters(name))


class LoraAdapterSet(AdapterSet):
    """The named LoRA adapters living inside one frozen backbone model."""

    def _layers(self) -> list[tuple[str, LoraLinear]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLinear)]

    def add(self, name: str) -> None:
        """Create adapter ``name`` (peft init: A random, B zero, so it starts as the identity)."""
        if name in self.names:
            raise ValueError(f"adapter {name!r} exists already")
        config = LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            bias="none",
            target_modules=self.targets,
        )
        with warnings.catch_warnings():  # peft warns that several adapters share a model: that is the design
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(config, self.model, adapter_name=name)
        for _, layer in self._layers():
            layer.forward = _routed_forward(layer, self.route)
        self.names.append(name)
        self.set_trainable(None)

    def parameters(self, name: str) -> list[nn.Parameter]:
        out = []
        for _, layer in self._layers():
            if name in layer.lora_A:
                out += [layer.lora_A[name].weight, layer.lora_B[name].weight]
        return out

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        sd = {}
        for mod_name, layer in self._layers():
            if name in layer.lora_A:
                sd[f"{mod_name}.lora_A.weight"] = layer.lora_A[name].weight.detach().cpu().contiguous()
                sd[f"{mod_name}.lora_B.weight"] = layer.lora_B[name].weight.detach().cpu().contiguous()
        return sd

    def load_state_dict(self, name: str, sd: dict[str, torch.Tensor]) -> None:
        want = set(self.state_dict(name))
        got = set(sd)
        if want != got:
            missing, unexpected = sorted(want - got), sorted(got - want)
            raise ValueError(f"adapter {name!r}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
        layers = dict(self._layers())
        with torch.no_grad():
            for key, t in sd.items():
                mod_name, which = key.rsplit(".lora_", 1)
                part = layers[mod_name].lora_A if which.startswith("A") else layers[mod_name].lora_B
                if part[name].weight.shape != t.shape:
                    raise ValueError(f"adapter {name!r}: {key} has shape {tuple(t.shape)}, expected {tuple(part[name].weight.shape)}")
                part[name].weight.copy_(t)

    def analytic_params(self) -> int:
        """r * (in + out) summed over the wrapped Linear layers: what one adapter must cost."""
        mods = dict(self.model.named_modules())
        total = 0
        for n in self.targets:
            m = mods[n]
            base = m.base_layer if isinstance(m, LoraLinear) else m
            total += self.cfg.r * (base.in_features + base.out_features)
        return total
