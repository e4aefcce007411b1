"""Train one task on top of the previous state; evaluate; select exemplars.

``train_task(previous_state, task_manifest, memory, params, out_dir) -> out_dir`` is the unit that the one-process
stream (``lorax train``), the DVC stages and the Prefect flows all call. It checkpoints every epoch into
``<out_dir>.partial/`` and resumes from there when re-run, and writes the final state atomically, so an interrupted
task never damages the previous state.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lorax.config import Params
from lorax.continual import ddp
from lorax.continual import metrics as M
from lorax.continual.embedding_store import EmbeddingStore, adapter_key, image_ids
from lorax.continual.feature_cache import FrozenFeatureCache, wants_feature_cache
from lorax.continual.memory import ExemplarMemory, per_class_budget
from lorax.continual.methods import Method, build_method, count_trainable, logits_and_features
from lorax.continual.state import load_state, save_state
from lorax.continual.trunk_cache import (
    TokenSlotDataset,
    TrunkCache,
    content_seeds,
    eval_ids,
    open_trunk_cache,
    train_ids,
)
from lorax.data.dataset import ManifestDataset, Resample, SeededSampler
from lorax.data.manifest import abs_paths, check_no_val_in_training, verify_files
from lorax.utils.io import atomic_path

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """Training diverged; the previous state is untouched."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} asked for but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def _autocast(params: Params, device: torch.device):
    if params.train.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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


def _norm(method: Method) -> tuple[tuple[float, ...], tuple[float, ...]]:
    bb = getattr(method, "net", method)
    bb = getattr(bb, "backbone", None) or method.backbones[0]
    return bb.info.mean, bb.info.std


def _dataset(df: pd.DataFrame, method: Method, params: Params, train: bool, seed: int,
             n_crops: int = 1, resample: Resample | None = None) -> ManifestDataset:
    """The rows as a dataset (``n_crops``: eval crops stacked per row; ``resample``: the shortcut control); pixels
    from the uint8 decode cache when ``train.decode_cache`` is on and they fit (never resampled ones)."""
    mean, std = _norm(method)
    links = params.data.follow_links
    kw = dict(train=train, crop=params.model.img_size, mean=mean, std=std, seed=seed, n_crops=n_crops,
              follow_links=links)
    if resample is not None:
        return ManifestDataset(df, resample=resample, **kw)
    if params.train.decode_cache:
        from lorax.data.cache import CachedManifestDataset, open_decode_cache

        t = params.train
        cache = open_decode_cache(df, t.decode_cache_dir, t.decode_cache_max_mb, follow_links=links)
        if cache is not None:
            return CachedManifestDataset(df, cache, **kw)
    return ManifestDataset(df, **kw)


def _loader(df: pd.DataFrame, method: Method, params: Params, train: bool, seed: int, batch_size: int | None = None,
            ctx: ddp.DistContext | None = None, cache: FrozenFeatureCache | None = None,
            device: torch.device | None = None, n_crops: int = 1,
            resample: Resample | None = None) -> torch.utils.data.DataLoader:
    """Batches of ``(images, class_ids, rows)`` (``cache``: cache slots instead of rows); same batches and crops
    as ``make_loader(seed=seed)``, whatever ``num_workers``; under DDP this rank's share of each global batch."""
    ctx = ctx or ddp.DistContext()
    ds = _dataset(df, method, params, train, seed, n_crops, resample)
    gen = torch.Generator().manual_seed(seed)
    if cache is not None:
        ds, sampler = cache.dataset(ds), cache.sampler(gen)
    else:
        sampler = SeededSampler(len(ds), shuffle=train, generator=gen)
    bs = batch_size or (params.train.batch_size if train else params.eval.batch_size)
    workers = params.train.num_workers
    return torch.utils.data.DataLoader(
        ds, batch_sampler=ddp.ShardedBatchSampler(sampler, bs, ctx.rank, ctx.world), num_workers=workers,
        generator=gen, persistent_workers=workers > 0, pin_memory=device is not None and device.type == "cuda",
    )


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a sync; channels-last images on CUDA (faster patch-embedding convolutions)."""
    if device.type == "cuda" and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


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
                     ctx: ddp.DistContext) -> TokenSlotDataset:
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
        trunk.fill(method.net, loader, ids, device, _autocast(params, device), desc="trunk cache")
        ctx.barrier()
        trunk.refresh()  # the other ranks' shards
        log.info("trunk cache: %d of %d crops computed (%.1f s), %d reused", len(todo), len(ids),
                 time.time() - t0, len(ids) - len(todo))
    else:
        log.info("trunk cache: all %d crops reused", len(ids))
    return TokenSlotDataset(trunk, ids, rows["class_id"].to_numpy(dtype=np.int64))


def _epoch_loader(rows: pd.DataFrame, method: Method, params: Params, seed: int, ctx: ddp.DistContext,
                  cache: FrozenFeatureCache | None, tokens: TokenSlotDataset | None,
                  device: torch.device) -> torch.utils.data.DataLoader:
    """One epoch's batches: cached trunk tokens per slot, or images (fixed crops per slot with ``cache``)."""
    if tokens is None:
        return _loader(rows, method, params, train=True, seed=seed, ctx=ctx, cache=cache, device=device)
    gen = torch.Generator().manual_seed(seed)
    workers = params.train.num_workers
    return torch.utils.data.DataLoader(
        tokens, batch_sampler=ddp.ShardedBatchSampler(cache.sampler(gen), params.train.batch_size, ctx.rank,
                                                      ctx.world),
        num_workers=workers, generator=gen, persistent_workers=workers > 0, pin_memory=device.type == "cuda")


def _ckpt_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial") / "checkpoint.pt"


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
    ``continual.head`` refit | ncm: the class head is then refit on those rows (:func:`refit_class_head`);
    ``store``: where that refit reads and keeps LoRAX's embeddings.
    """
    out_dir = Path(out_dir)
    task = str(task_manifest["task"].iloc[0])
    ctx = ddp.context()  # torchrun: one process per device, each a share of every batch
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
        base = _dataset(rows, method, params, True, seed)
        if trunk is not None:
            tokens = _training_tokens(trunk, method, rows, base, slots, params, device, ctx)
        if old_cached:
            slots.build(method.net, tokens if tokens is not None else base, params.eval.batch_size, device,
                        _autocast(params, device), ctx, params.train.num_workers, from_trunk=tokens is not None)
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
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
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
            x, y = _to_device(x, device), y.to(device, non_blocking=True)
            old_emb = cache.lookup(key, device) if cache is not None and cache.emb is not None else None
            with _autocast(params, device):
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
        if callback is not None:
            callback(epoch + 1, row)
        with atomic_path(ckpt) as tmp:
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

    head_info = {}
    if params.continual.head != "linear" and ctx.is_main:
        head_info = refit_class_head(method, rows, params, device, store)
    method.to("cpu").eval()
    info = {
        "task": task,
        "task_index": task_index,
        "trainable_params_per_task": prev_info.get("trainable_params_per_task", []) + [count_trainable(method)],
        "seconds_per_task": prev_info.get("seconds_per_task", []) + [round(time.time() - t0, 2)],
        "epochs": history_rows,
        "backbone_params": _backbone_param_count(method),
        "backbone_pretrained": bool(params.model.pretrained),
        **head_info,
        **(extra_info or {}),
    }
    if ctx.is_main:
        save_state(method, out_dir, params, info)
        shutil.rmtree(ckpt.parent, ignore_errors=True)
    ctx.barrier()  # the other ranks read the state rank 0 wrote
    return out_dir


def _class_head(method: Method) -> torch.nn.Linear:
    head = getattr(getattr(method, "net", None), "head", None) or getattr(method, "head", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"continual.head: method {method.name!r} has no linear class head to refit")
    return head


def refit_class_head(method: Method, rows: pd.DataFrame, params: Params, device: torch.device,
                     store: EmbeddingStore | None = None) -> dict[str, Any]:
    """Replace the class head by one refit (``continual.head``: refit | ncm; :mod:`lorax.continual.head`) on the
    eval-view features (``eval.crops`` averaged) of ``rows`` (this task's train rows + the replayed exemplars).
    Returns the state info's ``head`` entry."""
    from lorax.continual.head import refit_head

    c = params.continual
    t0 = time.time()
    head = _class_head(method)
    _, feats = predict_logits(method, rows, params, device, features=True, desc="head refit", store=store)
    x = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    if x.shape[1] != head.in_features:
        raise ValueError(f"continual.head: features of width {x.shape[1]} do not feed a head of {head.in_features}")
    w, b = refit_head(x, torch.tensor(rows["class_id"].to_numpy(np.int64)), head.out_features, c.head,
                      c.head_c, c.head_max_iter)
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.device))
        head.bias.copy_(b.to(head.bias.device))
    log.info("head refit (%s) on %d rows x %d features: %.1f s", c.head, len(rows), x.shape[1], time.time() - t0)
    return {"head": {"kind": c.head, "c": c.head_c, "rows": len(rows), "seconds": round(time.time() - t0, 2)}}


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


@torch.no_grad()
def predict_logits(method: Method, df: pd.DataFrame, params: Params, device: torch.device | None = None,
                   features: bool = False, desc: str = "eval",
                   store: EmbeddingStore | None = None,
                   resample: Resample | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (and optionally the super-features) of every row of ``df`` with eval transforms: the centre crop, or
    the average over ``eval.crops`` fixed crops (the crop policy of :class:`lorax.serving.predict.Predictor`).
    ``resample``: (scale, filter), every image resized before cropping (the shortcut control).

    ``store``: LoRAX reads the frozen adapters' embeddings it already has there and computes only the missing
    (image, adapter) pairs, which it adds (:mod:`lorax.continual.embedding_store`); rows it has every embedding of
    are not decoded, but their files are still checked against the manifest
    (:func:`~lorax.data.manifest.verify_files`)."""
    device = device or resolve_device(params.train.device)
    method.to(device).eval()
    if store is not None and uses_embedding_store(method):
        emb = _stored_embeddings(method, df, params, device, store, desc, resample)  # (N, T, D)
        logits = [method.net.classify(e.permute(1, 0, 2).to(device))[0].float().cpu()
                  for e in torch.split(emb, params.eval.batch_size)]
        out = torch.cat(logits).numpy() if logits else np.zeros((0, method.n_classes), np.float32)
        return out, (emb.reshape(len(emb), -1).numpy() if features else None)
    n_crops = params.eval.crops
    loader = _loader(df, method, params, train=False, seed=0, device=device, n_crops=n_crops, resample=resample)
    logits, feats = [], []
    for x, _, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        x = _to_device(x.flatten(0, 1) if x.dim() == 5 else x, device)
        with _autocast(params, device):
            if features:  # one backbone pass for both (exemplar selection, the open-set calibration)
                out, f = logits_and_features(method, x)
                feats.append(_crop_mean(f.float(), n_crops))
            else:
                out = method(x)[0]
            logits.append(_crop_mean(out.float(), n_crops))
    # one device -> host copy at the end: no per-batch sync
    return torch.cat(logits).cpu().numpy(), (torch.cat(feats).cpu().numpy() if features else None)


def uses_embedding_store(method: Method) -> bool:
    """LoRAX: its per-task adapters are frozen after their task, so their embeddings can be kept."""
    net = getattr(method, "net", None)
    return method.name == "lorax" and hasattr(net, "embeddings") and hasattr(net, "classify")


def adapter_keys(method: Method, params: Params, resample: Resample | None = None) -> list[str]:
    """The store key of every task's adapter (its tensors, the backbone and adapter settings, the eval view)."""
    from lorax.config import params_to_dict

    d = params_to_dict(params)
    mean, std = _norm(method)
    view = {"model": d["model"], "adapter": d["adapter"], "crops": params.eval.crops, "mean": mean, "std": std}
    if resample is not None:  # only then: the as-is keys stay those of earlier runs
        view["resample"] = list(resample)
    if params.train.trunk_cache and method.net.branch_block > 0:  # embeddings from fp16 trunk tokens: kept apart
        view["trunk_tokens"] = "fp16"
    return [adapter_key(method.net.adapters.state_dict(t), view) for t in method.tasks]


def _stored_embeddings(method: Method, df: pd.DataFrame, params: Params, device: torch.device,
                       store: EmbeddingStore, desc: str, resample: Resample | None = None) -> torch.Tensor:
    """(N, T, D) embeddings of ``df``'s rows by every task's adapter: the stored ones read, the rest computed in
    one pass per group of rows missing the same adapters (old images: the newest adapter only), then stored."""
    ids, keys = image_ids(df), adapter_keys(method, params, resample)
    n, t, n_crops = len(df), len(keys), params.eval.crops
    emb = np.zeros((n, t, method.net.embed_dim), dtype=np.float32)
    missing = np.ones((n, t), dtype=bool)
    for j, key in enumerate(keys):
        found, vals = store.lookup(key, ids)
        if vals is not None:
            emb[found, j] = vals[found]
            missing[found, j] = False
    verify_files(df.iloc[np.flatnonzero(~missing.any(1))], params.data.follow_links)  # the others: in the loaders
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in np.flatnonzero(missing.any(1)):
        groups.setdefault(tuple(np.flatnonzero(missing[r]).tolist()), []).append(int(r))
    # the trunk cache holds the as-is crops of the files: a resampled control view is computed
    trunk = open_trunk_cache(method, params, device) if groups and resample is None else None
    for cols, rows in groups.items():
        names = [method.tasks[j] for j in cols]
        if trunk is not None:
            got = _trunk_embeddings(method, df.iloc[rows], names, params, device, trunk, desc)
        else:
            loader = _loader(df.iloc[rows], method, params, train=False, seed=0, device=device, n_crops=n_crops,
                             resample=resample)
            parts = []
            for x, _, _ in tqdm(loader, desc=f"{desc}: {len(names)} of {t} adapters", leave=False, disable=None):
                x = _to_device(x.flatten(0, 1) if x.dim() == 5 else x, device)
                with _autocast(params, device):
                    e = method.net.embeddings(x, names)  # (G, B * crops, D)
                parts.append(_crop_mean(e.float().permute(1, 0, 2), n_crops).cpu())
            got = torch.cat(parts).numpy()  # (rows, G, D)
        emb[np.ix_(rows, list(cols))] = got
        for g, j in enumerate(cols):
            store.add(keys[j], ids[rows], got[:, g])
    return torch.from_numpy(emb)


def _trunk_embeddings(method: Method, df: pd.DataFrame, names: list[str], params: Params, device: torch.device,
                      trunk: TrunkCache, desc: str) -> np.ndarray:
    """(rows, len(names), D) embeddings of the eval crops from cached trunk tokens (the missing ones computed and
    stored first; rows with every crop cached are not decoded, so their files are checked here)."""
    n_crops = params.eval.crops
    ids = eval_ids(df, params.model.img_size, n_crops)
    missing = ~trunk.found(ids)
    need = missing.reshape(-1, n_crops).any(1)
    verify_files(df[~need], params.data.follow_links)
    if need.any():
        sub = np.flatnonzero(need)
        loader = _loader(df.iloc[sub], method, params, train=False, seed=0, device=device, n_crops=n_crops)
        trunk.fill(method.net, _reindexed(loader, sub), ids, device, _autocast(params, device),
                   desc=f"{desc}: trunk cache")
    parts, bs = [], params.eval.batch_size
    for start in tqdm(range(0, len(df), bs), desc=f"{desc}: {len(names)} adapters from the trunk cache",
                      leave=False, disable=None):
        tok = trunk.get(ids[start * n_crops:(start + bs) * n_crops]).to(device, non_blocking=True)
        with _autocast(params, device):
            e = method.net.branch(tok, names)  # (G, B * crops, D)
        parts.append(_crop_mean(e.float().permute(1, 0, 2), n_crops).cpu())
    return torch.cat(parts).numpy()


def _reindexed(loader, rows: np.ndarray):
    """``loader``'s batches with positions in the loader's frame mapped back to ``rows``' frame."""
    for x, y, index in loader:
        yield x, y, torch.from_numpy(rows[index.numpy()])


def _crop_mean(t: torch.Tensor, n_crops: int) -> torch.Tensor:
    return t.view(-1, n_crops, *t.shape[1:]).mean(1) if n_crops > 1 else t


def val_rows(manifests: list[pd.DataFrame]) -> pd.DataFrame:
    """The val rows of the seen tasks, in task order: what one column of the accuracy matrix is measured on."""
    return pd.concat([m[m["split"] == "val"] for m in manifests], ignore_index=True)


def score_val(val: pd.DataFrame, logits: np.ndarray, tasks: list[str]) -> tuple[dict, pd.DataFrame]:
    """Metrics dict (one column of R) and the per-image table of ``val_rows``' logits."""
    targets = val["class_id"].to_numpy()
    task_ids = val["task_index"].to_numpy()
    result = M.evaluate_logits(logits, targets, task_ids, len(tasks))
    table = M.prediction_table([str(p) for p in abs_paths(val)], logits, targets, task_ids, task_names=tasks)
    return result, table


def evaluate_controls(method: Method, val: pd.DataFrame, params: Params, device: torch.device | None = None,
                      store: EmbeddingStore | None = None) -> dict[str, dict]:
    """The shortcut controls of one evaluation: ``{"resampled": metrics}`` of the same rows, every image resized
    by ``eval.resample_control`` before cropping; ``{}`` when it is off. Stored in the eval json as ``control``."""
    rc = params.eval.resample_control
    if rc is None:
        return {}
    logits, _ = predict_logits(method, val, params, device, desc="eval (resampled)", store=store,
                               resample=(rc.scale, rc.filter))
    result, _ = score_val(val, logits, method.tasks)
    result.pop("confusion", None)
    return {"resampled": {**result, "scale": rc.scale, "filter": rc.filter}}


def evaluate_task_list(method: Method, manifests: list[pd.DataFrame], params: Params,
                       device: torch.device | None = None,
                       store: EmbeddingStore | None = None) -> tuple[dict, pd.DataFrame]:
    """Evaluate on the val rows of the seen tasks: metrics dict (one column of R; with ``control`` when
    ``eval.resample_control`` is set) and a per-image table."""
    val = val_rows(manifests)
    logits, _ = predict_logits(method, val, params, device, store=store)
    result, table = score_val(val, logits, method.tasks)
    control = evaluate_controls(method, val, params, device, store)
    if control:
        result["control"] = control
    return result, table


def select_exemplars(method: Method, task_manifest: pd.DataFrame, memory: ExemplarMemory | None,
                     params: Params, device: torch.device | None = None,
                     store: EmbeddingStore | None = None) -> ExemplarMemory:
    """Memory after this task: old classes shrunk to the new per-class budget, new classes selected.

    Selection uses eval transforms (no augmentation) on all of the task's train rows at once, so it is
    deterministic and global: the same in every process.
    """
    memory = ExemplarMemory(memory.rows()) if memory is not None else ExemplarMemory()
    n_classes = method.n_classes
    c = params.continual
    budget = per_class_budget(c.memory_size, n_classes, c.memory_mode, c.memory_per_class)
    memory.shrink(budget)
    if budget == 0:
        return memory
    rows = task_manifest[task_manifest["split"] == "train"].reset_index(drop=True)
    feats = None
    if c.selection != "random":
        _, feats = predict_logits(method, rows, params, device, features=True, desc="exemplars", store=store)
    else:
        feats = np.zeros((len(rows), 1), dtype=np.float32)
    memory.add_classes(rows, feats, method=c.selection, budget=budget, seed=params.seed)
    return memory
