"""Train one task on top of the previous state (evaluation: :mod:`lorax.continual.evaluation`; exemplar selection:
:mod:`lorax.continual.selection`).

``train_task(previous_state, task_manifest, memory, params, out_dir) -> out_dir`` is the unit that the one-process
stream (``lorax train``), the DVC stages and the Prefect flows all call. It reads as: the training rows, their batch
source (:class:`~lorax.continual.batch_source.BatchSource`, which hides the feature store), the epoch loop (one
``model(**inputs)`` per step), the state. It checkpoints every epoch into
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

import pandas as pd
import torch
from tqdm.auto import tqdm

from lorax.config import Params
from lorax.continual import distributed
from lorax.continual.batch_source import BatchSource
from lorax.continual.batches import autocast, resolve_device
from lorax.features import open_store
from lorax.features.store import FeatureStore
from lorax.continual.cross_fit import CrossFit, cross_fit_features
from lorax.continual.head import fit_heads
from lorax.continual.memory import ExemplarMemory
from lorax.continual.methods import Method, build_method, count_trainable
from lorax.continual.state import load_state, resume_dir, resume_dirs, save_state
from lorax.continual.trace_methods import uses_traces
from lorax.data.manifest import check_no_val_in_training
from lorax.models.backbone_factory import weights_record
from lorax.utils.io import atomic_path

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
    store: FeatureStore | None = None,
) -> Path:
    """Add the task in ``task_manifest`` to the model in ``previous_state`` (None: first task) and train it.

    ``memory`` holds the exemplars of the earlier classes (replayed with this task's data); ``history`` the earlier
    tasks' manifests (only the joint oracle trains on them). Returns ``out_dir``, a complete state.
    Then :func:`~lorax.continual.head.fit_heads` refits the class head on those rows (``continual.head`` refit |
    ncm) and fits the real/fake verdict (``continual.verdict``), with ``continual.cross_fit`` on the out-of-fold
    newest slices of k fold copies of the task (:mod:`lorax.continual.cross_fit`); ``store``: the feature store its
    frozen parts' outputs are read from and kept in (default: the ``cache:`` settings' store).
    """
    out_dir = Path(out_dir)
    task = str(task_manifest["task"].iloc[0])
    ctx = distributed.context()  # torchrun: one process per device, each a share of every batch
    if params.continual.cross_fit and ctx.distributed:
        raise ValueError("continual.cross_fit: the fold copies train in one process; run without torchrun, or set "
                         "continual.cross_fit: 0")
    device = ctx.device or resolve_device(params.train.device)
    t0 = time.time()
    method, prev_info = _grown_method(previous_state, task_manifest, params)
    task_index = len(method.tasks) - 1
    method.to(device)
    rows = training_rows(method, task_manifest, memory, history)  # what the head, verdict and sets are fitted on
    replay = memory.replay(params.continual.replay_size) if memory is not None else None
    trained = rows if replay is memory else training_rows(method, task_manifest, replay, history)
    seed = params.seed * 1000 + task_index
    store = store if store is not None else open_store(params.cache)
    source = BatchSource(trained, method, params, seed, device, ctx, store)
    replayed = len(replay) if replay is not None and method.uses_memory and not method.cumulative_data else 0
    log.info("task %s: %d training rows (%d of %d exemplars replayed), %d epochs of %d batches on %s", task,
             len(trained), replayed, len(memory) if memory is not None else 0, params.train.epochs, len(source),
             device)
    epochs = _fit(method, source, params, task, learning_rate(params, task_index), seed, out_dir, ctx, callback)

    cross: CrossFit | None = None
    if params.continual.cross_fit:  # the head / verdict / sets fitted on out-of-fold newest slices

        def train_copy(copy_rows: pd.DataFrame, scratch: Path) -> Method:
            """The task trained again from the same start (initialisation and training seeds) on ``copy_rows``."""
            copy, _ = _grown_method(previous_state, task_manifest, params)
            copy.to(device)
            copy_source = BatchSource(copy_rows, copy, params, seed, device, ctx, store)
            _fit(copy, copy_source, params, task, learning_rate(params, task_index), seed, scratch, ctx, None)
            return copy

        cross = cross_fit_features(rows, params, device, store, train_copy, resume_dir(out_dir) / "cross_fit")
    head_info = fit_heads(method, rows, params, device, store, cross.newest if cross else None) if ctx.is_main \
        else {}
    if cross is not None:
        head_info = {**head_info, "cross_fit": cross.info(),
                     "cross_fit_seconds_per_task": prev_info.get("cross_fit_seconds_per_task", []) + [cross.seconds]}
    method.to("cpu").eval()
    info = {
        "task": task,
        "task_index": task_index,
        "trainable_params_per_task": prev_info.get("trainable_params_per_task", []) + [count_trainable(method)],
        "seconds_per_task": prev_info.get("seconds_per_task", []) + [round(time.time() - t0, 2)],
        "epochs": epochs,
        "training_rows": len(trained), "replayed_exemplars": replayed, "fit_rows": len(rows),
        "backbone_params": _backbone_param_count(method),
        "backbone_pretrained": bool(params.model.pretrained),
        "backbone_weights": weights_record(params.model),
        **head_info,
        **_trace_cost(method, prev_info),
        **(extra_info or {}),
    }
    if ctx.is_main:
        save_state(method, out_dir, params, info)
        for d in resume_dirs(out_dir):  # only once the state is saved: until then they are the resume point
            shutil.rmtree(d, ignore_errors=True)
    ctx.barrier()  # the other ranks read the state rank 0 wrote
    return out_dir


def _grown_method(previous_state: str | Path | None, task_manifest: pd.DataFrame,
                  params: Params) -> tuple[Method, dict[str, Any]]:
    """The previous state's method (or a new one) with the manifest's task added, and the previous state's info."""
    task = str(task_manifest["task"].iloc[0])
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
    torch.manual_seed(params.seed + task_index)  # the new adapter's / head's initialisation
    method.add_task(task)
    return method, prev_info


def _fit(method: Method, source: BatchSource, params: Params, task: str, lr: float, seed: int, out_dir: Path,
         ctx: distributed.DistContext, callback: EpochCallback | None) -> list[dict[str, float]]:
    """The epochs of one task (from its last epoch checkpoint, if any); returns the per-epoch history."""
    device = source.device
    trainable = method.trainable_parameters()
    model = ctx.wrap(method, find_unused=params.adapter.kind == "mole")  # routed experts may idle a step
    optimizer = torch.optim.AdamW(method.param_groups(lr), weight_decay=params.train.weight_decay)
    total = len(source) * params.train.epochs
    scheduler = cosine_with_warmup(optimizer, params.train.warmup_epochs * len(source), total)
    ckpt = _ckpt_path(out_dir)
    start_epoch, history = _resume(out_dir, task, trainable, optimizer, scheduler)

    for epoch in range(start_epoch, params.train.epochs):
        t_epoch = time.time()
        g = torch.Generator().manual_seed(seed * 100 + epoch)
        torch.manual_seed(seed * 100 + epoch)
        batches = source.epoch(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        model.train()
        tot = torch.zeros(3, device=device)  # loss sum, correct, images (on device: no per-step host sync)
        bad = torch.zeros((), dtype=torch.bool, device=device)
        desc = f"{task} epoch {epoch + 1}/{params.train.epochs}"
        for step, batch in enumerate(tqdm(batches, desc=desc, total=len(source), leave=False,
                                          disable=None if ctx.is_main else True)):
            with autocast(params, device):
                out = model(batch.x)
                loss = method.loss(out, batch.targets)
            bad |= ~torch.isfinite(loss.detach())
            # on CUDA the check (a host sync) runs every 32 steps; non-finite steps never reach a saved state
            if (device.type != "cuda" or (step + 1) % 32 == 0 or step + 1 == len(source)) and bool(bad):
                raise NonFiniteLossError(
                    f"task {task}, epoch {epoch + 1}, step {step + 1}: loss is {loss.item()}; lower the learning rate "
                    f"(train.lr_first/lr_later) or enable train.grad_clip. The previous state is untouched."
                )
            optimizer.zero_grad(set_to_none=True)
            (loss * batch.weight).backward()
            if params.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, params.train.grad_clip)
            optimizer.step()
            scheduler.step()
            n = batch.n_mine
            ok = (out[0].argmax(1)[:n] == batch.targets[:n]).sum()
            tot += torch.stack([loss.detach().float() * n, ok.float(), torch.tensor(float(n), device=device)])
        tot = ctx.all_reduce_sum(tot).cpu()
        row = {"epoch": epoch + 1, "loss": float(tot[0] / tot[2]), "train_acc": 100.0 * float(tot[1] / tot[2]),
               "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        log.info("task %s epoch %d/%d: loss %.4f train acc %.1f%% (%.1f s)", task, epoch + 1, params.train.epochs,
                 row["loss"], row["train_acc"], time.time() - t_epoch)
        if ctx.is_main:
            # before the callback: a resumed task never reports an epoch twice
            _save_checkpoint(ckpt, task, epoch, trainable, optimizer, scheduler, history)
            if callback is not None:
                callback(epoch + 1, row)
    return history


def _resume(out_dir: Path, task: str, trainable: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, list[dict[str, float]]]:
    """Load the task's epoch checkpoint into the parameters, optimizer and schedule; (next epoch, history)."""
    found = next((d / CHECKPOINT for d in resume_dirs(out_dir) if (d / CHECKPOINT).is_file()), None)
    if found is None:
        return 0, []
    saved = torch.load(found, map_location="cpu", weights_only=True)
    if saved.get("task") != task or saved.get("n_params") != len(trainable):
        return 0, []
    with torch.no_grad():
        for p, v in zip(trainable, saved["params"], strict=True):
            p.copy_(v)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    log.info("task %s: resuming from the checkpoint of epoch %d", task, int(saved["epoch"]) + 1)
    return int(saved["epoch"]) + 1, json.loads(saved["history"])


def _save_checkpoint(ckpt: Path, task: str, epoch: int, trainable: list[torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     history: list[dict[str, float]]) -> None:
    with atomic_path(ckpt) as tmp:
        torch.save({"task": task, "epoch": epoch, "n_params": len(trainable),
                    "params": [p.detach().cpu() for p in trainable], "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "history": json.dumps(history)}, tmp)


def _backbone_param_count(method: Method) -> int:
    """Size of one backbone, without the per-task LoRA/MoLE weights that peft injects into LoRAX's backbone (0: a
    method without one, ``trace``)."""
    if method.base_backbone() is None:
        return 0
    skip = {id(p) for p in method.adapter_parameters()}
    return sum(p.numel() for p in method.base_backbone().parameters() if id(p) not in skip)


def _trace_cost(method: Method, prev_info: dict[str, Any]) -> dict[str, Any]:
    """A trace method's newest expert, per task beside the adapter's count: its parameters and the seconds its
    forward passes took in training (backward not included); for ``lorax+trace`` the adapter's own parameters."""
    experts = getattr(method, "experts", None)
    if not uses_traces(method) or experts is None:
        return {}
    cost = experts.cost()
    out = {"trace_params_per_task": prev_info.get("trace_params_per_task", []) + [cost["params"]],
           "trace_forward_seconds_per_task": prev_info.get("trace_forward_seconds_per_task", [])
           + [cost["forward_seconds"]]}
    if method.frozen_task_adapters:
        n = sum(p.numel() for p in method.net.adapters.parameters(method.tasks[-1]))
        out["adapter_params_per_task"] = prev_info.get("adapter_params_per_task", []) + [n]
    return out
