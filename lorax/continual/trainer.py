"""Train one task on top of the previous state (evaluation: :mod:`lorax.continual.evaluation`; exemplar selection:
:mod:`lorax.continual.selection`).

``train_task(previous_state, task_manifest, memory, params, out_dir) -> out_dir`` is the unit that the one-process
stream (``lorax train``), the DVC stages and the Prefect flows all call. It checkpoints every epoch into
``<out_dir>.resume/`` and resumes from there when re-run, and writes the final state atomically, so an interrupted
task never damages the previous state.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lorax.config import Params
from lorax.continual import distributed
from lorax.continual.batches import autocast, dataset_for, loader_for, resolve_device, to_device
from lorax.continual.feature_cache import FrozenFeatureCache, wants_feature_cache
from lorax.continual.memory import ExemplarMemory
from lorax.continual.methods import Method, build_method, count_trainable
from lorax.continual.state import load_state, resume_dir, resume_dirs, save_state
from lorax.continual.trunk_cache import (
    TokenSlotDataset,
    TrunkCache,
    content_seeds,
    open_trunk_cache,
    train_ids,
)
from lorax.data.dataset import ManifestDataset
from lorax.data.manifest import check_no_val_in_training, verify_files
from lorax.models.backbone_factory import weights_record
from lorax.utils.io import atomic_path
from lorax.continual.head import fit_heads
from lorax.continual.embedding_store import EmbeddingStore

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """Training diverged; the previous state is untouched."""


def learning_rate(params: Params, task_index: int) -> float:
    """Paper: 1e-4 for the first task, 5e-4 later, both times batch/512 (``train.lr_scale_batch``)."""
    lr = params.train.lr_first if task_index == 0 else params.train.lr_later
    if params.train.lr_scale_batch:
        lr *= params.train.batch_size / 512
    return lr


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_rows(method: Method, task_df: pd.DataFrame, memory: ExemplarMemory | None,
                  history: list[pd.DataFrame] | None = None) -> pd.DataFrame:
    """This task's train rows, plus replayed exemplars (or, for the joint oracle, all earlier train rows)."""
    parts = [task_df[task_df["split"] == "train"]]
    if method.cumulative_data:
        parts += [h[h["split"] == "train"] for h in history or []]
    elif method.uses_memory and memory is not None and len(memory):
        parts.append(memory.manifest())
    rows = pd.concat(parts, ignore_index=True)
    if rows.empty:
        raise ValueError(f"task {task_df['task'].iloc[0] if len(task_df) else '?'}: no training images")
    check_no_val_in_training(rows, [task_df, *(history or [])])
    return rows


def _training_tokens(trunk: TrunkCache, method: Method, rows: pd.DataFrame, base: ManifestDataset,
                     slots: FrozenFeatureCache, params: Params, device: torch.device,
                     ctx: distributed.DistContext) -> TokenSlotDataset:
    """The slots' trunk tokens: the missing ones computed (ranks split them) and stored; rows whose every crop was
    found are not decoded, so their files are checked against the manifest here."""
    ids = train_ids(base, rows, slots.seeds)
    missing = ~trunk.found(ids)
    k = slots.k
    hit_rows = ~missing.reshape(-1, k).any(1)
    verify_files(rows[hit_rows], params.data.follow_links)
    todo = np.flatnonzero(missing)
    if len(todo):
        mine = todo[ctx.rank::ctx.world].tolist()
        loader = torch.utils.data.DataLoader(slots.dataset(base), batch_size=params.eval.batch_size, sampler=mine,
                                             num_workers=params.train.num_workers)
        t0 = time.time()
        trunk.fill(method.net, loader, ids, device, autocast(params, device), desc="trunk cache")
        ctx.barrier()
        trunk.refresh()  # the other ranks' shards
        log.info("trunk cache: %d of %d crops computed (%.1f s), %d reused", len(todo), len(ids),
                 time.time() - t0, len(ids) - len(todo))
    else:
        log.info("trunk cache: all %d crops reused", len(ids))
    return TokenSlotDataset(trunk, ids, rows["class_id"].to_numpy(dtype=np.int64))


def _epoch_loader(rows: pd.DataFrame, method: Method, params: Params, seed: int, ctx: distributed.DistContext,
                  cache: FrozenFeatureCache | None, tokens: TokenSlotDataset | None,
                  device: torch.device) -> torch.utils.data.DataLoader:
    """One epoch's batches: cached trunk tokens per slot, or images (fixed crops per slot with ``cache``)."""
    if tokens is None:
        return loader_for(rows, method, params, train=True, seed=seed, ctx=ctx, cache=cache, device=device)
    gen = torch.Generator().manual_seed(seed)
    workers = params.train.num_workers
    return torch.utils.data.DataLoader(
        tokens, batch_sampler=distributed.ShardedBatchSampler(cache.sampler(gen), params.train.batch_size, ctx.rank,
                                                      ctx.world),
        num_workers=workers, generator=gen, persistent_workers=workers > 0, pin_memory=device.type == "cuda")


CHECKPOINT = "checkpoint.pt"  # in the resume folder (lorax.continual.state.resume_dir)


def _ckpt_path(out_dir: Path) -> Path:
    """The epoch checkpoint to write; reading falls back to an older project's folder (:func:`resume_dirs`)."""
    return resume_dir(out_dir) / CHECKPOINT


def train_task(
    previous_state: str | Path | None,
    task_manifest: pd.DataFrame,
    memory: ExemplarMemory | None,
    params: Params,
    out_dir: str | Path,
    *,
    history: list[pd.DataFrame] | None = None,
    callback: EpochCallback | None = None,
    extra_info: dict[str, Any] | None = None,
    store: EmbeddingStore | None = None,
) -> Path:
    """Add the task in ``task_manifest`` to the model in ``previous_state`` (None: first task) and train it.

    ``memory`` holds the exemplars of the earlier classes (replayed with this task's data); ``history`` the earlier
    tasks' manifests (only the joint oracle trains on them). Returns ``out_dir``, a complete state.
    Then :func:`~lorax.continual.head.fit_heads` refits the class head on those rows (``continual.head`` refit |
    ncm) and fits the real/fake verdict (``continual.verdict``); ``store``: where it reads and keeps LoRAX's
    embeddings.
    """
    out_dir = Path(out_dir)
    task = str(task_manifest["task"].iloc[0])
    ctx = distributed.context()  # torchrun: one process per device, each a share of every batch
    device = ctx.device or resolve_device(params.train.device)
    t0 = time.time()
    if previous_state is not None:
        method, prev_info = load_state(previous_state, device="cpu", params=params)
    else:
        method, prev_info = build_method(params), {}
    task_index = len(method.tasks)
    expected = int(task_manifest["task_index"].iloc[0])
    if expected != task_index:
        raise ValueError(
            f"task {task}: manifest says task index {expected} but the previous state has {task_index} tasks "
            f"({method.tasks}); the stream order and the manifests disagree"
        )
    torch.manual_seed(params.seed + task_index)
    method.add_task(task)
    method.to(device)
    rows = training_rows(method, task_manifest, memory, history)
    seed = params.seed * 1000 + task_index
    cache = tokens = None
    trunk = open_trunk_cache(method, params, device)  # frozen blocks' tokens of the fixed crops, on disk
    old_cached = wants_feature_cache(method, params)  # old adapters' embeddings of the fixed crops, once per task
    content = params.train.crop_seed == "content" or (params.train.crop_seed == "auto" and trunk is not None)
    if old_cached or content:  # K fixed crops per row for the whole task
        k = params.train.feature_cache_crops
        slots = FrozenFeatureCache(len(rows), k, seed, content_seeds(rows, k) if content else None)
        base = dataset_for(rows, method, params, True, seed)
        if trunk is not None:
            tokens = _training_tokens(trunk, method, rows, base, slots, params, device, ctx)
        if old_cached:
            slots.build(method.net, tokens if tokens is not None else base, params.eval.batch_size, device,
                        autocast(params, device), ctx, params.train.num_workers, from_trunk=tokens is not None)
        cache = slots
    loader = _epoch_loader(rows, method, params, seed, ctx, cache, tokens, device)
    trainable = method.trainable_parameters()
    model = ctx.wrap(method, find_unused=params.adapter.kind == "mole")  # routed experts may idle a step
    optimizer = torch.optim.AdamW(method.param_groups(learning_rate(params, task_index)),
                                  weight_decay=params.train.weight_decay)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * params.train.epochs
    scheduler = cosine_with_warmup(optimizer, params.train.warmup_epochs * steps_per_epoch, total)

    start_epoch, history_rows = 0, []
    ckpt = _ckpt_path(out_dir)
    found = next((d / CHECKPOINT for d in resume_dirs(out_dir) if (d / CHECKPOINT).is_file()), None)
    if found is not None:
        saved = torch.load(found, map_location="cpu", weights_only=True)
        if saved.get("task") == task and saved.get("n_params") == len(trainable):
            with torch.no_grad():
                for p, v in zip(trainable, saved["params"], strict=True):
                    p.copy_(v)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            start_epoch = int(saved["epoch"]) + 1
            history_rows = json.loads(saved["history"])
            log.info("task %s: resuming from the checkpoint of epoch %d", task, start_epoch)

    for epoch in range(start_epoch, params.train.epochs):
        g = torch.Generator().manual_seed(seed * 100 + epoch)
        torch.manual_seed(seed * 100 + epoch)
        loader = _epoch_loader(rows, method, params, int(torch.randint(0, 2**31 - 1, (1,), generator=g)), ctx,
                               cache, tokens, device)
        model.train()
        tot, n = torch.zeros(2, device=device), 0  # loss sum, correct (on device: no per-step host sync); images
        bad = torch.zeros((), dtype=torch.bool, device=device)
        bar = tqdm(loader, desc=f"{task} epoch {epoch + 1}/{params.train.epochs}", leave=False,
                   disable=None if ctx.is_main else True)
        for step, (x, y, key) in enumerate(bar):
            x, y = to_device(x, device), y.to(device, non_blocking=True)
            old_emb = cache.lookup(key, device) if cache is not None and cache.emb is not None else None
            with autocast(params, device):
                out = model(x, old_emb, from_trunk=True) if tokens is not None else (
                    model(x) if old_emb is None else model(x, old_emb))
                loss = method.loss(out, y)
            bad |= ~torch.isfinite(loss.detach())
            # on CUDA the check (a host sync) runs every 32 steps; non-finite steps never reach a saved state
            if (device.type != "cuda" or (step + 1) % 32 == 0 or step + 1 == len(loader)) and bool(bad):
                raise NonFiniteLossError(
                    f"task {task}, epoch {epoch + 1}, step {step + 1}: loss is {loss.item()}; lower the learning rate "
                    f"(train.lr_first/lr_later) or enable train.grad_clip. The previous state is untouched."
                )
            n_mine, weight = loader.batch_sampler.share(step)  # DDP: this rank's share of the global batch
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            if params.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, params.train.grad_clip)
            optimizer.step()
            scheduler.step()
            ok = (out[0].argmax(1)[:n_mine] == y[:n_mine]).sum()
            tot += torch.stack([loss.detach().float() * n_mine, ok.float()])
            n += n_mine
        tot = ctx.all_reduce_sum(torch.cat([tot, torch.tensor([float(n)], device=device)])).cpu()
        row = {"epoch": epoch + 1, "loss": float(tot[0] / tot[2]), "train_acc": 100.0 * float(tot[1] / tot[2]),
               "lr": optimizer.param_groups[0]["lr"]}
        history_rows.append(row)
        log.info("task %s epoch %d/%d: loss %.4f train acc %.1f%%", task, epoch + 1, params.train.epochs,
                 row["loss"], row["train_acc"])
        if not ctx.is_main:
            continue
        with atomic_path(ckpt) as tmp:  # before the callback: a resumed task never reports an epoch twice
            torch.save(
                {
                    "task": task,
                    "epoch": epoch,
                    "n_params": len(trainable),
                    "params": [p.detach().cpu() for p in trainable],
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": json.dumps(history_rows),
                },
                tmp,
            )
        if callback is not None:
            callback(epoch + 1, row)

    head_info = fit_heads(method, rows, params, device, store) if ctx.is_main else {}
    method.to("cpu").eval()
    info = {
        "task": task,
        "task_index": task_index,
        "trainable_params_per_task": prev_info.get("trainable_params_per_task", []) + [count_trainable(method)],
        "seconds_per_task": prev_info.get("seconds_per_task", []) + [round(time.time() - t0, 2)],
        "epochs": history_rows,
        "backbone_params": _backbone_param_count(method),
        "backbone_pretrained": bool(params.model.pretrained),
        "backbone_weights": weights_record(params.model),
        **head_info,
        **(extra_info or {}),
    }
    if ctx.is_main:
        save_state(method, out_dir, params, info)
        for d in resume_dirs(out_dir):  # only once the state is saved: until then they are the resume point
            shutil.rmtree(d, ignore_errors=True)
    ctx.barrier()  # the other ranks read the state rank 0 wrote
    return out_dir


def _frozen_backbone(method: Method) -> torch.nn.Module:
    if hasattr(method, "net"):
        return method.net.backbone
    if hasattr(method, "backbone"):
        return method.backbone
    return method.backbones[0]


def _backbone_param_count(method: Method) -> int:
    """Size of one backbone, without the per-task LoRA/MoLE weights that peft injects into LoRAX's backbone."""
    adapters = getattr(getattr(method, "net", None), "adapters", None)
    skip = {id(p) for t in method.tasks for p in adapters.parameters(t)} if adapters is not None else set()
    return sum(p.numel() for p in _frozen_backbone(method).parameters() if id(p) not in skip)
