"""Name -> implementation registries, in the style of timm's model registry and peft's tuner types.

Methods (LoRAX, baselines, CLIP-MoLE variants) register by name so the CLI, the pipeline and the tests can
iterate over all of them without import lists scattered around the code base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


# Continual-learning methods (lorax, finetune, der, joint, probe; trace, lorax+trace): see lorax/continual/methods.py
# and lorax/continual/trace_methods.py
METHODS = Registry("continual method")
# Real-vs-fake detector methods (mole, probe, shared, separate): see lorax/detect/
DETECTORS = Registry("detector method")
