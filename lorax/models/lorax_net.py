"""The LoRAX network: frozen backbone + one LoRA adapter per task + super-feature + expandable head.

Forward (docs/design.md section 2): every task's adapter turns the image into an embedding; the embeddings are
concatenated into the super-feature (embed_dim x tasks) and classified by a linear head over 2 x tasks classes.
A 3-way diversity head sees only the newest adapter's embedding (old class -> 0, new real -> 1, new fake -> 2).
Only the newest adapter and the two heads train.

The published implementation runs the full backbone once per adapter. Here blocks before the first adapted one
run once per image (the shared trunk) and, with ``one_pass``, all adapters share one batched pass after it (on CPU
in groups of at most :data:`CPU_GROUP_ROWS` rows, so the activations stay in cache); ``one_pass=False`` keeps the sequential loop as the reference the fast path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorax.config import AdapterConfig
from lorax.models.adapters import LoraAdapterSet
from lorax.models.backbones import Backbone

# Rows (images x tokens) of one grouped pass on CPU: a larger group spills the per-layer activations out of the
# cache and runs slower per image than the loop (measured: benchmarks/RESULTS.md). None = one group.
CPU_GROUP_ROWS: int | None = 4096


def adapter_groups(names: list[str], rows_per_adapter: int, max_rows: int | None) -> list[list[str]]:
    """``names`` split into consecutive groups of at most ``max_rows`` rows (at least one adapter per group)."""
    if max_rows is None or len(names) * rows_per_adapter <= max_rows:
        return [names]
    size = max(1, max_rows // max(1, rows_per_adapter))
    return [names[i:i + size] for i in range(0, len(names), size)]


@dataclass
class Frozen:
    """A training batch as LoRAX's frozen parts left it (``lorax.continual.frozen_parts``): the trunk's tokens
    (B, L, D) and the old adapters' embeddings (T - 1, B, D; None in the first task)."""

    trunk: torch.Tensor
    old: torch.Tensor | None = None

    def to(self, device: torch.device) -> Frozen:
        return Frozen(self.trunk.to(device), None if self.old is None else self.old.to(device))



class LoRAXNet(nn.Module):
    def __init__(self, backbone: Backbone, adapter_cfg: AdapterConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter_cfg = adapter_cfg
        depth = backbone.depth
        prefixes = None
        if adapter_cfg.blocks == "last_k":
            if adapter_cfg.last_k > depth:
                raise ValueError(f"adapter.last_k: {adapter_cfg.last_k} exceeds the backbone's {depth} blocks")
            prefixes = [backbone.block_prefix(i) for i in range(depth - adapter_cfg.last_k, depth)]
        if adapter_cfg.kind == "mole":  # a MoLE adapter per task (lorax/models/mole_adapters.py), same interface
            from lorax.models.mole_adapters import MoleAdapterSet

            self.adapters = MoleAdapterSet(backbone.model, adapter_cfg, prefixes)
        else:
            self.adapters = LoraAdapterSet(backbone.model, adapter_cfg, prefixes)
        # The trunk ends at the first block holding an adapted module.
        self.branch_block = min(
            i for i in range(depth) if any(t.startswith(backbone.block_prefix(i)) for t in self.adapters.targets)
        ) if any(t.startswith(backbone.block_prefix(i)) for i in range(depth) for t in self.adapters.targets) else 0
        self.tasks: list[str] = []
        self.head: nn.Linear | None = None
        self.div_head: nn.Linear | None = None
        self.one_pass = True

    # -- structure ---------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Width of one adapter's embedding (the backbone's features: pooled last block + feature levels)."""
        return self.backbone.feature_dim

    @property
    def n_classes(self) -> int:
        return 2 * len(self.tasks)

    def add_task(self, name: str) -> None:
        """New adapter, head grown by two classes (old weights copied), fresh diversity head; old parts frozen."""
        d = self.embed_dim
        self.adapters.add(name)
        self.tasks.append(name)
        t = len(self.tasks)
        new_head = nn.Linear(d * t, 2 * t)
        if self.head is not None:
            with torch.no_grad():
                new_head.weight[: 2 * (t - 1), : d * (t - 1)].copy_(self.head.weight)
                new_head.weight[: 2 * (t - 1), d * (t - 1) :].zero_()
                new_head.bias[: 2 * (t - 1)].copy_(self.head.bias)
        ref = next(self.backbone.parameters())
        self.head = new_head.to(ref.device)
        self.div_head = nn.Linear(d, 3).to(ref.device)
        self.adapters.set_trainable(name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = self.adapters.parameters(self.tasks[-1]) if self.tasks else []
        for h in (self.head, self.div_head):
            if h is not None:
                params += list(h.parameters())
        return params

    def train(self, mode: bool = True) -> LoRAXNet:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout / drop-path in the backbone itself
        self.adapters.route.dropout = mode
        return self

    # -- forward -----------------------------------------------------------------------------------------------
    def _shared_widths(self) -> list[int]:
        """Widths of the features every adapter shares (the same for every task): the pixel features (spectrum),
        then two token features per feature level among the trunk's blocks."""
        bb = self.backbone
        levels = sum(1 for i in bb.levels if i < self.branch_block)
        return ([bb.spectrum_dim] if bb.spectrum_dim else []) + [2 * bb.embed_dim] * levels

    def _shared_rows(self) -> int:
        """Token rows that carry the shared features at the end of :meth:`trunk`'s output."""
        return -(-sum(self._shared_widths()) // self.backbone.embed_dim)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """What the adapted blocks need from what no adapter touches (identical for every task): the trunk blocks'
        output tokens (B, L, D), followed by the shared features (:meth:`_shared_widths`) laid out, zero-padded,
        in rows of width D, so one tensor carries both (the feature store keeps it as is)."""
        bb = self.backbone
        shared = bb.pixel_features(x)
        tokens = bb.run_blocks(bb.stem(x), 0, self.branch_block, levels=shared)
        if not shared:
            return tokens
        b, d = tokens.shape[0], tokens.shape[-1]
        flat = torch.cat(shared, 1).to(tokens.dtype)
        flat = torch.nn.functional.pad(flat, (0, self._shared_rows() * d - flat.shape[1]))
        return torch.cat([tokens, flat.view(b, -1, d)], 1)

    def _split_trunk(self, trunk: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`trunk`'s output -> (tokens, the shared features)."""
        n, widths = self._shared_rows(), self._shared_widths()
        if not n:
            return trunk, []
        flat = trunk[:, -n:].reshape(trunk.shape[0], -1)[:, : sum(widths)]  # the padding dropped
        return trunk[:, :-n], list(flat.split(widths, 1))

    def embeddings(self, x: torch.Tensor, names: list[str] | None = None, one_pass: bool | None = None) -> torch.Tensor:
        """Embeddings of ``names`` (default: every task) as a (len(names), B, D) tensor."""
        return self.branch(self.trunk(x), names, one_pass)

    def branch(self, trunk: torch.Tensor, names: list[str] | None = None,
               one_pass: bool | None = None) -> torch.Tensor:
        """Embeddings of ``names`` from the trunk's output (what :meth:`trunk` returns, or the feature store holds)."""
        names = list(self.tasks if names is None else names)
        one_pass = self.one_pass if one_pass is None else one_pass
        route = self.adapters.route
        b = trunk.shape[0]
        tokens, shared = self._split_trunk(trunk)
        if one_pass and len(names) > 1:
            limit = CPU_GROUP_ROWS if tokens.device.type == "cpu" else None
            rows = tokens.shape[:-1].numel()  # images x tokens entering the adapted blocks
            outs = []
            for group in adapter_groups(names, rows, limit):
                if len(group) == 1:
                    with route.using(group[0]):
                        outs.append(self._adapted_blocks(tokens, list(shared)))
                    continue
                with route.using(names=group):
                    rep = tokens.repeat(len(group), *([1] * (tokens.dim() - 1)))
                    outs.append(self._adapted_blocks(rep, [s.repeat(len(group), 1) for s in shared]))
            return torch.cat(outs).view(len(names), b, -1)
        outs = []
        for name in names:
            with route.using(name):
                outs.append(self._adapted_blocks(tokens, list(shared)))
        return torch.stack(outs)

    def _adapted_blocks(self, tokens: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        """The blocks from ``branch_block`` on, under the current routing, pooled into embeddings."""
        bb = self.backbone
        return bb.features(bb.run_blocks(tokens, self.branch_block, levels=levels), levels)

    def classify(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, B, D) embeddings -> (class logits over 2T, diversity logits over 3)."""
        t, b, d = emb.shape
        feat = emb.permute(1, 0, 2).reshape(b, t * d)
        return self.head(feat), self.div_head(emb[-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and diversity logits of images: :meth:`classify` of :meth:`branch` of :meth:`trunk` (callers that
        hold stored trunk tokens or old embeddings compose the parts themselves)."""
        return self.classify(self.embeddings(x))

    def super_features(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings(x)
        return emb.permute(1, 0, 2).reshape(x.shape[0], -1)

    # -- accounting --------------------------------------------------------------------------------------------
    def analytic_trainable_params(self) -> int:
        """Adapter r*(in+out) per wrapped layer + head (D*T x 2T + 2T) + diversity head (D x 3 + 3)."""
        t, d = len(self.tasks), self.embed_dim
        return self.adapters.analytic_params() + (d * t * 2 * t + 2 * t) + (d * 3 + 3)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {
            "head.weight": self.head.weight.detach().cpu().contiguous(),
            "head.bias": self.head.bias.detach().cpu().contiguous(),
            "div_head.weight": self.div_head.weight.detach().cpu().contiguous(),
            "div_head.bias": self.div_head.bias.detach().cpu().contiguous(),
        }

    def load_head_state(self, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key in ("head.weight", "head.bias", "div_head.weight", "div_head.bias"):
                mod = self.head if key.startswith("head") else self.div_head
                target = getattr(mod, key.split(".")[1])
                if target.shape != sd[key].shape:
                    raise ValueError(f"{key}: checkpoint shape {tuple(sd[key].shape)} != model {tuple(target.shape)}")
                target.copy_(sd[key])


def diversity_targets(class_ids: torch.Tensor, task_index: int) -> torch.Tensor:
    """Old classes -> 0, the new task's real (2t) -> 1, its fake (2t+1) -> 2."""
    out = torch.zeros_like(class_ids)
    out[class_ids == 2 * task_index] = 1
    out[class_ids == 2 * task_index + 1] = 2
    return out
