"""Continual methods with trace experts (lorax/models/trace.py), registered by name beside the others.

* ``trace``        per task one :class:`~lorax.models.trace.TraceExpert` trained on the task's rows + the exemplar
                   memory, then frozen; the experts' embeddings concatenated (task order) into the super-feature
                   under an expandable linear head; the diversity head (old / new real / new fake) sees the newest
                   expert's embedding. No backbone at all.
* ``lorax+trace``  LoRAX, with each task's super-feature slice the concatenation of its adapter's embedding and its
                   trace expert's (adapter and expert trained together in the task, both frozen after it); the
                   diversity head sees the newest task's pair.

Training batches (:class:`~lorax.continual.batch_source.BatchSource`) carry the newest expert's input, the patches
of one trace view, and the old experts' embeddings of that view from the feature store
(:mod:`lorax.continual.trace_parts`), so old experts never run again over old views; evaluation reads every
expert's embeddings from the store the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from lorax.config import Params
from lorax.continual.methods import LoRAXMethod, Method, _cpu, grow_linear
from lorax.models.backbones import Backbone
from lorax.models.lorax_net import Frozen
from lorax.models.trace import TraceExpert, count_parameters
from lorax.registry import METHODS


@dataclass
class TraceInput:
    """A training batch of a trace method: the newest expert's patches (B, P, 3, p, p), the old experts' stored
    embeddings (B, T - 1, dim; None in the first task) and, for ``lorax+trace``, LoRAX's :class:`Frozen` batch."""

    patches: torch.Tensor
    old: torch.Tensor | None = None
    lorax: Frozen | None = None


class _Experts(nn.Module):
    """One trace expert per task, in task order; all but the newest frozen."""

    def __init__(self, params: Params) -> None:
        super().__init__()
        self.settings = params.trace
        self.list = nn.ModuleList()
        self.seconds = 0.0  # time spent in the newest expert's forward passes while training (reported per task)

    def add(self) -> TraceExpert:
        for e in self.list:
            e.requires_grad_(False)
            e.eval()
        ref = next(iter(self.list[-1].parameters()), None) if len(self.list) else None
        new = TraceExpert.from_settings(self.settings)
        if ref is not None:
            new = new.to(ref.device)
        self.list.append(new)
        self.seconds = 0.0
        return new

    def newest(self, patches: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.list[-1](patches)
        self.seconds += time.perf_counter() - t0
        return out

    def cost(self) -> dict[str, float]:
        return {"params": count_parameters(self.list[-1]), "forward_seconds": round(self.seconds, 2)}

    def of(self, tasks: list[str], task: str) -> TraceExpert:
        """The expert of ``task`` (experts are in the order of ``tasks``)."""
        return self.list[tasks.index(task)]

    def keep_old_frozen(self) -> None:
        """After ``Module.train()``: the old experts stay in eval mode (only the newest trains)."""
        for e in self.list[:-1]:
            e.eval()

    def tensor_groups(self, tasks: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """``experts/<task>``: each expert's tensors, for the state (:meth:`Method.tensor_groups`)."""
        return {f"experts/{t}": _cpu(e.state_dict()) for t, e in zip(tasks, self.list, strict=True)}

    def load_tensor_groups(self, tasks: list[str], groups: dict[str, dict[str, torch.Tensor]]) -> None:
        for t, e in zip(tasks, self.list, strict=True):
            e.load_state_dict(groups[f"experts/{t}"])


def _with_old(new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """(B, T, dim): the old experts' stored embeddings, then the newest one's."""
    return new.unsqueeze(1) if old is None else torch.cat([old.to(new.dtype), new.unsqueeze(1)], 1)


@METHODS.register("trace")
class TraceMethod(Method):
    name = "trace"
    trace_experts = True

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.experts = _Experts(params)
        self.head: nn.Linear | None = None
        self.div_head: nn.Linear | None = None
        self.aux_weight = params.continual.diversity_weight

    def expert(self, task: str) -> TraceExpert:
        return self.experts.of(self.tasks, task)

    def add_task(self, name: str) -> None:
        new = self.experts.add()
        self.tasks.append(name)
        d = self.params.trace.dim
        device = next(new.parameters()).device
        self.head = grow_linear(self.head, d * len(self.tasks), self.n_classes).to(device)
        self.div_head = nn.Linear(d, 3).to(device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.experts.list[-1].parameters(), *self.head.parameters(), *self.div_head.parameters()]

    def base_backbone(self) -> Backbone | None:  # type: ignore[override]
        return None

    def classify(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, dim) embeddings -> (class logits, diversity logits of the newest expert's embedding)."""
        return self.head(emb.flatten(1)), self.div_head(emb[:, -1])

    def forward(self, x: TraceInput) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classify(_with_old(self.experts.newest(x.patches), x.old))

    def features(self, x: TraceInput) -> torch.Tensor:
        return _with_old(self.experts.list[-1](x.patches), x.old).flatten(1)

    def train(self, mode: bool = True) -> TraceMethod:
        super().train(mode)
        self.experts.keep_old_frozen()
        return self

    def tensor_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        groups = self.experts.tensor_groups(self.tasks)
        groups["heads"] = _cpu({"head.weight": self.head.weight, "head.bias": self.head.bias,
                                "div_head.weight": self.div_head.weight, "div_head.bias": self.div_head.bias})
        return groups

    def load_tensor_groups(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        self.experts.load_tensor_groups(self.tasks, groups)
        with torch.no_grad():
            for key, v in groups["heads"].items():
                mod, attr = key.split(".")
                getattr(getattr(self, mod), attr).copy_(v)


@METHODS.register("lorax+trace")
class LoRAXTraceMethod(LoRAXMethod):
    """LoRAX whose per-task embedding is [adapter embedding, trace expert embedding]; ``net.head`` and
    ``net.div_head`` are sized for the pair, so :meth:`LoRAXNet.classify` reads the pairs unchanged."""

    name = "lorax+trace"
    trace_experts = True

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.experts = _Experts(params)

    def expert(self, task: str) -> TraceExpert:
        return self.experts.of(self.tasks, task)

    @property
    def pair_dim(self) -> int:
        return self.net.embed_dim + self.params.trace.dim

    def add_task(self, name: str) -> None:
        old_head, self.net.head = self.net.head, None  # LoRAXNet grows a head of adapter width: replaced below
        super().add_task(name)
        new = self.experts.add()
        device = next(new.parameters()).device
        t = len(self.tasks)
        self.net.head = grow_linear(old_head, self.pair_dim * t, 2 * t).to(device)
        self.net.div_head = nn.Linear(self.pair_dim, 3).to(device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters() + list(self.experts.list[-1].parameters())

    def forward(self, x: TraceInput | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if not isinstance(x, TraceInput) or x.lorax is None:
            raise TypeError("lorax+trace: the inputs are a TraceInput with LoRAX's Frozen batch (train.views >= 1)")
        net, f = self.net, x.lorax
        new = torch.cat([net.branch(f.trunk, [self.tasks[-1]])[0], self.experts.newest(x.patches)], -1)
        emb = new.unsqueeze(0)  # (1, B, pair)
        if f.old is not None:  # (T - 1, B, adapter dim) and (B, T - 1, trace dim)
            old = torch.cat([f.old.to(new.dtype), x.old.to(new.dtype).permute(1, 0, 2)], -1)
            emb = torch.cat([old, emb], 0)
        return net.classify(emb)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("lorax+trace: features come from the feature store (lorax/continual/evaluation.py)")

    def train(self, mode: bool = True) -> LoRAXTraceMethod:
        super().train(mode)
        self.experts.keep_old_frozen()
        return self

    def tensor_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        return {**super().tensor_groups(), **self.experts.tensor_groups(self.tasks)}

    def load_tensor_groups(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        super().load_tensor_groups(groups)
        self.experts.load_tensor_groups(self.tasks, groups)


def uses_traces(method: Method) -> bool:
    return bool(getattr(method, "trace_experts", False))
