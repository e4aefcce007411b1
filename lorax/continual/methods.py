"""Continual-learning methods behind one interface, registered by name (``continual.method``). (Over 350 lines:
the five methods side by side, so what each one trains, freezes and saves reads against the others in one place.)

Every method is an ``nn.Module`` that grows by :meth:`add_task`, says which parameters train, returns class logits
(and an optional auxiliary head's logits) and its loss, and saves/loads itself as named safetensors groups.
The trainer, the evaluation and the pipeline only see this interface, so LoRAX and the baselines run in the same
harness with the same metrics.

* ``lorax``    per-task LoRA adapters on a frozen backbone, super-feature, diversity head (the paper).
* ``finetune`` one backbone, fully trainable, expandable head: the forgetting reference.
* ``der``      DER without pruning: a full trainable backbone copy per task, features concatenated,
               auxiliary (old / new real / new fake) head like LoRAX's diversity head.
* ``joint``    the oracle: the finetune network trained at each step on all data seen so far (no memory limit).
* ``probe``    a linear head on frozen backbone features.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lorax.config import Params
from lorax.models.backbone_factory import create_backbone
from lorax.models.backbones import Backbone
from lorax.models.lorax_net import Frozen, LoRAXNet, diversity_targets
from lorax.registry import METHODS


def grow_linear(old: nn.Linear | None, in_features: int, out_features: int) -> nn.Linear:
    """A larger Linear whose top-left block is ``old`` (old classes keep their weights; new inputs start at 0)."""
    new = nn.Linear(in_features, out_features)
    if old is not None:
        o_out, o_in = old.weight.shape
        with torch.no_grad():
            new.weight[:o_out, :o_in].copy_(old.weight)
            new.weight[:o_out, o_in:].zero_()
            new.bias[:o_out].copy_(old.bias)
        new = new.to(old.weight.device)
    return new


class Method(nn.Module):
    """Base of all continual methods."""

    name: str = "?"
    uses_memory: bool = True  # replay exemplars of old classes
    cumulative_data: bool = False  # train step t on all data of tasks 0..t (joint oracle)
    aux_weight: float = 0.0
    backbone_frozen: bool = False  # the backbone never trains (LoRAX, probe): its outputs may be cached
    # one adapter per task, frozen after it (LoRAX): old embeddings and the trunk below the adapters may be cached
    frozen_task_adapters: bool = False

    def __init__(self, params: Params) -> None:
        super().__init__()
        self.params = params
        self.tasks: list[str] = []

    def add_task(self, name: str) -> None:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def base_backbone(self) -> Backbone:
        """The backbone whose normalisation the inputs follow and whose size the state reports (DER: its first)."""
        raise NotImplementedError

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Per-task weights inside the backbone's modules (peft's LoRA/MoLE layers), not part of its size."""
        return []

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of a full backbone (finetune / joint / DER): they train at
        ``train.backbone_lr_scale`` times the task's lr, as a pretrained network is fine-tuned."""
        return []

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: the trainable parameters at ``lr``, a trainable backbone's at the scaled lr."""
        backbone = self.backbone_parameters()
        slow = {id(p) for p in backbone}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in slow], "lr": lr}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * self.params.train.backbone_lr_scale})
        return groups

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features used for exemplar herding (the super-feature for LoRAX)."""
        raise NotImplementedError

    def loss(self, out: tuple[torch.Tensor, torch.Tensor | None], y: torch.Tensor) -> torch.Tensor:
        logits, aux = out
        loss = F.cross_entropy(logits, y)
        if aux is not None and self.aux_weight > 0:
            loss = loss + self.aux_weight * F.cross_entropy(aux, diversity_targets(y, len(self.tasks) - 1))
        return loss

    def tensor_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        """Named groups of tensors that fully describe the learned state (saved as group.safetensors)."""
        raise NotImplementedError

    def load_tensor_groups(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    @property
    def n_classes(self) -> int:
        return 2 * len(self.tasks)


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def logits_and_features(method: Method, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits and the method's ``features`` (the super-feature for LoRAX) from one backbone pass."""
    if method.frozen_task_adapters:
        emb = method.net.embeddings(x)
        logits, _ = method.net.classify(emb)
        return logits, emb.permute(1, 0, 2).reshape(x.shape[0], -1)
    f = method.features(x)
    head = getattr(method, "head", None)  # finetune / probe / joint / der: logits = head(features)
    if isinstance(head, torch.nn.Linear) and f.shape[-1] == head.in_features:
        return head(f), f
    return method(x)[0], f


@METHODS.register("lorax")
class LoRAXMethod(Method):
    name = "lorax"
    backbone_frozen = True
    frozen_task_adapters = True

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.net = LoRAXNet(create_backbone(params.model), params.adapter)
        self.net.one_pass = params.train.one_pass
        self.aux_weight = params.continual.diversity_weight

    def add_task(self, name: str) -> None:
        self.net.add_task(name)
        self.tasks.append(name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.net.trainable_parameters()

    def base_backbone(self) -> Backbone:
        return self.net.backbone

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for t in self.tasks for p in self.net.adapters.parameters(t)]

    def forward(self, x: torch.Tensor | Frozen) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and diversity logits of images, or of a :class:`Frozen` batch: the model's parts composed, with
        only the newest adapter run on the stored trunk tokens."""
        net = self.net
        if not isinstance(x, Frozen):
            return net(x)
        new = net.branch(x.trunk, [self.tasks[-1]])
        return net.classify(new if x.old is None else torch.cat([x.old.to(new.dtype), new], 0))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.super_features(x)

    def loss(self, out: tuple[torch.Tensor, torch.Tensor | None], y: torch.Tensor) -> torch.Tensor:
        loss = super().loss(out, y)
        if self.params.adapter.kind == "mole":  # the newest MoLE adapter's load-balancing loss (CLIP-MoLE)
            loss = loss + self.params.adapter.mole.balance_weight * self.net.adapters.balance_loss().float()
        return loss

    def tensor_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        groups = {f"adapters/{t}": self.net.adapters.state_dict(t) for t in self.tasks}
        groups["heads"] = self.net.head_state()
        return groups

    def load_tensor_groups(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        for t in self.tasks:
            self.net.adapters.load_state_dict(t, groups[f"adapters/{t}"])
        self.net.load_head_state(groups["heads"])

    def train(self, mode: bool = True) -> LoRAXMethod:
        super().train(mode)
        self.net.train(mode)
        return self


class _HeadOnBackbone(Method):
    """Shared code of finetune / joint / probe: one backbone and an expandable linear head."""

    backbone_trainable = True

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.backbone: Backbone = create_backbone(params.model)
        self.head: nn.Linear | None = None
        for p in self.backbone.parameters():
            p.requires_grad_(self.backbone_trainable)

    @property
    def backbone_frozen(self) -> bool:  # type: ignore[override]
        return not self.backbone_trainable

    def base_backbone(self) -> Backbone:
        return self.backbone

    def add_task(self, name: str) -> None:
        self.tasks.append(name)
        self.head = grow_linear(self.head, self.backbone.feature_dim, self.n_classes)
        self.head.to(next(self.backbone.parameters()).device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.head.parameters())
        if self.backbone_trainable:
            params = list(self.backbone.parameters()) + params
        return params

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) if self.backbone_trainable else []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.head(self.backbone(x)), None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def train(self, mode: bool = True) -> _HeadOnBackbone:
        super().train(mode)
        if not self.backbone_trainable:
            self.backbone.eval()
        return self

    def tensor_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        groups = {"heads": _cpu({"head.weight": self.head.weight, "head.bias": self.head.bias})}
        if self.backbone_trainable:
            groups["backbone"] = _cpu(self.backbone.model.state_dict())
        return groups

    def load_tensor_groups(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            self.head.weight.copy_(groups["heads"]["head.weight"])
            self.head.bias.copy_(groups["heads"]["head.bias"])
        if self.backbone_trainable:
            self.backbone.model.load_state_dict(groups["backbone"])


@METHODS.register("finetune")
class FinetuneMethod(_HeadOnBackbone):
    name = "finetune"


@METHODS.register("joint")
class JointMethod(_HeadOnBackbone):
    name = "joint"
    uses_memory = False
    cumulative_data = True


@METHODS.register("probe")
class ProbeMethod(_HeadOnBackbone):
    name = "probe"
    backbone_trainable = False


@METHODS.register("der")
class DERMethod(Method):
    """DER (Yan et al. 2021) without pruning: one full backbone per task, the newest initialised from the last."""

    name = "der"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.backbones = nn.ModuleList()
        self.head: nn.Linear | None = None
        self.aux_head: nn.Linear | None = None
        self.aux_weight = params.continual.diversity_weight
        self._template = create_backbone(params.model)

    def add_task(self, name: str) -> None:
        self.tasks.append(name)
        src = self.backbones[-1] if len(self.backbones) else self._template
        new = copy.deepcopy(src)
        for bb in self.backbones:
            bb.requires_grad_(False)
            bb.eval()
        new.requires_grad_(True)
        self.backbones.append(new)
        d = new.feature_dim
        self.head = grow_linear(self.head, d * len(self.tasks), self.n_classes)
        self.aux_head = nn.Linear(d, 3).to(next(new.parameters()).device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.backbones[-1].parameters()) + list(self.head.parameters()) + list(self.aux_head.parameters())

    def base_backbone(self) -> Backbone:
        return self.backbones[0] if len(self.backbones) else self._template

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbones[-1].parameters())

    def _embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [bb(x) for bb in self.backbones]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embs = self._embeddings(x)
        return self.head(torch.cat(embs, 1)), self.aux_head(embs[-1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._embeddings(x), 1)

    def train(self, mode: bool = True) -> DERMethod:
        super().train(mode)
        for bb in self.backbones[:-1]:
            bb.eval()
        return self

    def tensor_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        groups = {f"backbones/{t}": _cpu(bb.model.state_dict()) for t, bb in zip(self.tasks, self.backbones, strict=True)}
        groups["heads"] = _cpu(
            {
                "head.weight": self.head.weight,
                "head.bias": self.head.bias,
                "aux_head.weight": self.aux_head.weight,
                "aux_head.bias": self.aux_head.bias,
            }
        )
        return groups

    def load_tensor_groups(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        for t, bb in zip(self.tasks, self.backbones, strict=True):
            bb.model.load_state_dict(groups[f"backbones/{t}"])
        with torch.no_grad():
            for key in ("head.weight", "head.bias", "aux_head.weight", "aux_head.bias"):
                mod = self.head if key.startswith("head") else self.aux_head
                getattr(mod, key.split(".")[1]).copy_(groups["heads"][key])


def build_method(params: Params, tasks: list[str] | None = None) -> Method:
    """Instantiate ``params.continual.method`` and grow it to ``tasks`` (weights still random)."""
    cls = METHODS.get(params.continual.method)
    method = cls(params)
    for t in tasks or []:
        method.add_task(t)
    return method


def count_trainable(method: Method) -> int:
    return sum(p.numel() for p in method.trainable_parameters())
