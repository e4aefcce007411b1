"""One task's training batches: images of the task's views, or for LoRAX what its frozen parts made of them.

``train.views`` (K) fixed views per training row (:func:`lorax.features.views.train_views`), each epoch one of them
per row (seeded); K = 0: a fresh random crop every epoch. For a method whose per-task adapters freeze (LoRAX), each
view's trunk tokens and the old adapters' embeddings of it come from the feature store
(:mod:`lorax.continual.frozen_parts`): computed once, in every task, run and process, and a step runs only the
newest adapter on the stored tokens (the batch is a :class:`~lorax.continual.methods.Frozen`). Whether the store
is on disk or in memory changes nothing but the time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from lorax.config import Params
from lorax.continual import distributed
from lorax.continual.batches import dataset_for, loader_for, sharded_loader, to_device
from lorax.continual.frozen_parts import adapter_embeddings, adapter_producer, trunk_producer, trunk_tokens
from lorax.continual.methods import Method
from lorax.continual.trace_methods import TraceInput, uses_traces
from lorax.continual.trace_parts import native_dataset, trace_embeddings, trace_train_views, view_patches
from lorax.data.patches import NativePatches
from lorax.models.lorax_net import Frozen
from lorax.features.store import FeatureStore, StoreRows
from lorax.features.views import Views, train_views

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One training step's share of a batch: ``method(x)`` gives the outputs ``method.loss`` compares with
    ``targets``; ``n_mine`` of the rows are this rank's own, and its loss counts ``weight`` of the global batch."""

    x: torch.Tensor | Frozen | TraceInput
    targets: torch.Tensor
    n_mine: int
    weight: float


class ViewSampler(Sampler[int]):
    """One epoch: every row once in a seeded random order, each with one of its K views (seeded); yields slots."""

    def __init__(self, n_rows: int, k: int, generator: torch.Generator) -> None:
        self.n_rows, self.k, self.generator = n_rows, k, generator

    def __len__(self) -> int:
        return self.n_rows

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n_rows, generator=self.generator)
        pick = torch.randint(0, self.k, (self.n_rows,), generator=self.generator)
        yield from (order * self.k + pick[order]).tolist()


class _Slots(Dataset):
    """Slot ``row * K + k`` -> (view k of row: its pixels, or its stored trunk tokens, and with trace experts its
    native patches (a pair then); class id; slot)."""

    def __init__(self, base: Dataset | None, views: Views | None, class_ids: np.ndarray, tokens: StoreRows | None,
                 patches: NativePatches | None = None, k: int = 1) -> None:
        self.base, self.views, self.class_ids, self.tokens, self.patches = base, views, class_ids, tokens, patches
        self.k = views.k if views is not None else k

    def __len__(self) -> int:
        return len(self.class_ids) * self.k

    def __getitem__(self, slot: int) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], int, int]:
        row, k = divmod(int(slot), self.k)
        parts = []
        if self.tokens is not None:
            parts.append(self.tokens[int(slot)])
        elif self.base is not None:
            parts.append(self.base[(row, int(self.views.seeds[row, k]))][0])
        if self.patches is not None:
            parts.append(self.patches[int(slot)][0])
        return (parts[0] if len(parts) == 1 else tuple(parts)), int(self.class_ids[row]), int(slot)


class BatchSource:
    """One task's training batches (see the module docstring), so the training loop only calls the model."""

    def __init__(self, rows: pd.DataFrame, method: Method, params: Params, seed: int, device: torch.device,
                 ctx: distributed.DistContext, store: FeatureStore) -> None:
        self.rows, self.method, self.params, self.device, self.ctx = rows, method, params, device, ctx
        self.views: Views | None = None
        self.slots: _Slots | None = None
        self.old: torch.Tensor | None = None  # (slots, T - 1, D): the frozen adapters' embeddings of every view
        k = params.train.views
        traces = uses_traces(method)
        self.trace_old: torch.Tensor | None = None  # (slots, T - 1, dim): the frozen trace experts' embeddings
        if traces and not k:
            raise ValueError(f"continual.method {method.name}: trace experts train on fixed views; set train.views "
                             ">= 1 (0 draws fresh crops every epoch, which the feature store cannot keep)")
        if k:
            base = dataset_for(rows, method, params, True, seed) if method.base_backbone() is not None else None
            self.views = train_views(rows, base, k) if base is not None else None
            tokens = None
            if method.frozen_task_adapters:
                trunk_tokens(method, params, store, base, rows, self.views, device, rank=ctx.rank, world=ctx.world,
                             read=False)
                ctx.barrier()
                key = trunk_producer(method, params, device)[0]
                store.refresh(key)  # the other ranks' shards
                tokens = store.reader(key, self.views.ids)
                if len(method.tasks) > 1:
                    self.old = self._old_embeddings(store, base)
                    if device.type == "cuda":
                        self.old = self.old.pin_memory()
            patches = None
            if traces:
                native = native_dataset(rows, params)
                tviews = trace_train_views(rows, params, k)
                patches = view_patches(native, tviews)
                if len(method.tasks) > 1:  # every rank its own (the experts are small)
                    self.trace_old = trace_embeddings(method, params, store, native, rows, tviews, method.tasks[:-1],
                                                      device, desc="old trace experts")
            self.slots = _Slots(base, self.views, rows["class_id"].to_numpy(dtype=np.int64), tokens, patches, k)
        self.steps = len(self._loader(seed))

    def _old_embeddings(self, store: FeatureStore, base: Dataset) -> torch.Tensor:
        """(slots, T - 1, D): the frozen adapters' embeddings of every view. With a store on disk under DDP, rank 0
        computes the missing ones and the other ranks read them; in memory, every rank computes its own."""
        method, ctx, old = self.method, self.ctx, self.method.tasks[:-1]
        shared = store.persistent and ctx.world > 1
        if shared and not ctx.is_main:
            ctx.barrier()
            for t in old:
                store.refresh(adapter_producer(method, self.params, self.device, t)[0])
        emb = adapter_embeddings(method, self.params, store, base, self.rows, self.views, old, self.device,
                                 desc="old adapters", files_checked=True)  # trunk_tokens checked or decoded them
        if shared and ctx.is_main:
            ctx.barrier()
        return emb

    def _loader(self, seed: int) -> torch.utils.data.DataLoader:
        """One epoch's batches of ``(images or tokens, class ids, rows or slots)``, shuffled by ``seed``."""
        if self.slots is None:
            return loader_for(self.rows, self.method, self.params, train=True, seed=seed, ctx=self.ctx,
                              device=self.device)
        gen = torch.Generator().manual_seed(seed)
        return sharded_loader(self.slots, ViewSampler(len(self.rows), self.slots.k, gen), self.params.train.batch_size,
                       self.params, self.ctx, gen, self.device)

    def __len__(self) -> int:
        """Steps per epoch."""
        return self.steps

    def epoch(self, seed: int) -> Iterator[Batch]:
        """The batches of one epoch, on the device, shuffled (and cropped) by ``seed``."""
        loader = self._loader(seed)
        # Opening the loader draws a base seed from the generator its sampler shares, so the shuffle and the crops
        # depend on how often it is opened: once before iterating keeps the batches of the earlier runs.
        iter(loader)
        frozen = self.slots is not None and self.slots.tokens is not None
        traces = self.slots is not None and self.slots.patches is not None
        for step, (x, y, key) in enumerate(loader):
            x = [to_device(t, self.device) for t in x] if isinstance(x, list | tuple) else to_device(x, self.device)
            patches = x.pop() if traces and isinstance(x, list) else (x if traces else None)
            if isinstance(x, list):
                (x,) = x
            if frozen:
                old = self.old[key].to(self.device, non_blocking=True).permute(1, 0, 2) if self.old is not None \
                    else None
                x = Frozen(x, old)
            if traces:
                old = self.trace_old[key].to(self.device, non_blocking=True) if self.trace_old is not None else None
                x = TraceInput(patches, old, x if frozen else None)
            n_mine, weight = loader.batch_sampler.share(step)  # DDP: this rank's share of the global batch
            yield Batch(x, y.to(self.device, non_blocking=True), n_mine, weight)
