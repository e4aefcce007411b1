"""Per-task MoLE adapters for LoRAX (``adapter.kind: mole``): each task owns a mixture of low-rank experts.

Neither paper has this: LoRAX gives every task a plain LoRA; here every task gets a CLIP-MoLE adapter instead (a
shared LoRA of rank ``adapter.mole.shared_rank`` plus top-1 routed experts of ranks ``adapter.mole.expert_ranks``,
:class:`~lorax.models.mole.MoLELinear`) on the same target linears (``adapter.target_modules``, ``adapter.blocks``).
:class:`MoleAdapterSet` has the interface of :class:`~lorax.models.adapters.LoraAdapterSet`, so the network, the
trainer and the state files do not care which kind they hold; the only addition is :meth:`MoleAdapterSet.balance_loss`,
which the LoRAX method adds to the task loss with weight ``adapter.mole.balance_weight``.

Each target ``nn.Linear`` is replaced once by a :class:`MoleAdapterLinear` that keeps the frozen layer and one
``MoLELinear`` per task. All tasks' MoLE layers share that one frozen layer, held as a plain attribute, so the
backbone's parameters and state dict list it once. Routing reads the shared :class:`~lorax.models.adapters.Route`:

* ``single``: one named adapter for the whole batch (the sequential reference);
* ``grouped``: the batch holds G copies of the images, slice g goes through adapter ``names[g]``. The frozen layer
  runs once on the whole batch; the low-rank parts loop over the slices, each computed exactly as in ``single``
  mode. Top-1 routing is per token and each adapter's balance loss is taken over its own slice, so a grouped pass
  gives every adapter the same output and the same balance loss as its own single pass.

Scaling is the detector's: every LoRA's factor a/r is 1 (the paper gives no alpha; ``adapter.alpha`` belongs to the
plain LoRA). ``adapter.dropout`` acts on the input of the adapter being trained only, as for the LoRA adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from lorax.config import AdapterConfig
from lorax.models.adapters import AdapterSet, Route
from lorax.models.mole import MoLELinear, balance_loss

__all__ = ["MoleAdapterLinear", "MoleAdapterSet"]


class MoleAdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one :class:`MoLELinear` per task, applied as the shared ``route`` says."""

    def __init__(self, base_layer: nn.Linear, route: Route) -> None:
        super().__init__()
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.base_layer = base_layer
        self.moles = nn.ModuleDict()
        self.route = route
        self.dropout_p = 0.0

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects ``.weight`` of a linear (dtype, device, shape)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add(self, name: str, shared_rank: int, expert_ranks: list[int]) -> MoLELinear:
        layer = MoLELinear(self.base_layer, shared_rank, expert_ranks, alpha=None)
        # Unregister the frozen layer from this task's MoLE (it stays reachable as ``layer.base``): registered once,
        # in ``base_layer``, so parameters, state dicts and device moves see it once.
        del layer._modules["base"]
        object.__setattr__(layer, "base", self.base_layer)
        self.moles[name] = layer
        return layer

    def _delta(self, name: str, x2: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route.dropout and name == route.train_name and self.dropout_p:
            x2 = nn.functional.dropout(x2, self.dropout_p, True)
        return self.moles[name].delta(x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        route = self.route
        if route.mode == "single":
            if route.name is None or route.name not in self.moles:
                return y
            d = self._delta(route.name, x.reshape(-1, x.shape[-1]))
            return y + d.reshape(y.shape).to(y.dtype)
        if route.mode == "grouped":
            xs = x.reshape(len(route.names), -1, x.shape[-1])
            d = torch.stack([self._delta(n, xs[g]) for g, n in enumerate(route.names)])
            return y + d.reshape(y.shape).to(y.dtype)
        return y


class MoleAdapterSet(AdapterSet):
    """The named MoLE adapters living inside one frozen backbone model (interface of ``LoraAdapterSet``)."""

    def __init__(self, model: nn.Module, cfg: AdapterConfig, block_prefixes: list[str] | None = None) -> None:
        super().__init__(model, cfg, block_prefixes)
        if any(isinstance(m, MoleAdapterLinear) for m in model.modules()):
            raise ValueError("model already holds MoLE adapters; build a fresh backbone for a new adapter set")
        mods = dict(model.named_modules())
        self._wrappers: list[tuple[str, MoleAdapterLinear]] = []
        for t in self.targets:
            parent_name, _, child = t.rpartition(".")
            wrapper = MoleAdapterLinear(mods[t], self.route)
            wrapper.dropout_p = cfg.dropout
            setattr(mods[parent_name] if parent_name else model, child, wrapper)
            self._wrappers.append((t, wrapper))

    def _layers(self) -> list[tuple[str, MoleAdapterLinear]]:
        return list(self._wrappers)

    def _moles(self, name: str) -> list[tuple[str, MoLELinear]]:
        if name not in self.names:
            raise KeyError(f"no MoLE adapter named {name!r}; adapters: {self.names}")
        return [(t, layer.moles[name]) for t, layer in self._layers()]

    def add(self, name: str) -> None:
        """Create adapter ``name`` in every target layer (B matrices zero, so it starts as the identity)."""
        if name in self.names:
            raise ValueError(f"adapter {name!r} exists already")
        if "." in name or not name:
            raise ValueError(f"adapter name {name!r}: must be non-empty without '.' (a task / generator name)")
        m = self.cfg.mole
        for _, layer in self._layers():
            layer.add(name, m.shared_rank, list(m.expert_ranks))
        self.names.append(name)
        self.set_trainable(None)

    def parameters(self, name: str) -> list[nn.Parameter]:
        return [p for _, layer in self._moles(name) for p in layer.parameters()]

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """``<target>.<tensor>`` (``shared_A``, ``expert_B.2``, ``router.weight``, ...) of adapter ``name``."""
        return {f"{t}.{k}": p.detach().cpu().contiguous()
                for t, layer in self._moles(name) for k, p in layer.named_parameters()}

    def load_state_dict(self, name: str, sd: dict[str, torch.Tensor]) -> None:
        own = {f"{t}.{k}": p for t, layer in self._moles(name) for k, p in layer.named_parameters()}
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"MoLE adapter {name!r}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]} "
                             "(saved with other adapter.mole / adapter.target_modules settings?)")
        with torch.no_grad():
            for key, p in own.items():
                t = sd[key]
                if p.shape != t.shape:
                    raise ValueError(f"MoLE adapter {name!r}: {key} has shape {tuple(t.shape)}, expected "
                                     f"{tuple(p.shape)} (saved with other adapter.mole ranks?)")
                p.copy_(t)

    def analytic_params(self) -> int:
        """(shared + sum of expert ranks) * (in + out) + experts * in (router), summed over the target layers."""
        m = self.cfg.mole
        rank = m.shared_rank + sum(m.expert_ranks)
        return sum(rank * (layer.in_features + layer.out_features) + len(m.expert_ranks) * layer.in_features
                   for _, layer in self._layers())

    def balance_loss(self, name: str | None = None) -> torch.Tensor:
        """Summed load-balancing loss of adapter ``name`` (default: the newest) over its layers, from the last
        forward that ran it."""
        if not self.names:
            raise RuntimeError("balance_loss: no MoLE adapter yet; add a task first")
        return balance_loss([layer for _, layer in self._moles(name or self.names[-1])])
