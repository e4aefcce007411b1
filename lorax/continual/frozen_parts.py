"""What a method's frozen parts compute, through the feature store (:mod:`lorax.features.store`).

LoRAX's model is three parts (:class:`lorax.models.lorax_net.LoRAXNet`): the trunk (the blocks below the first
adapter, the same for every task), one branch per task (its adapter's blocks, frozen after the task) and the head.
Here each frozen part is a producer of the store: the trunk's tokens of a view, and each old adapter's embedding of
a view (computed from the stored tokens); the probe's frozen backbone features are a third. Training, evaluation,
selection, the head fits and the gate all read them from here, so a view is pushed through a frozen part once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lorax.config import Params
from lorax.continual.batches import autocast, image_norm
from lorax.continual.methods import Method
from lorax.data.dataset import ManifestDataset
from lorax.data.manifest import verify_files
from lorax.features.store import FeatureStore, hash_tensors, producer_key
from lorax.features.views import Views, view_batches

log = logging.getLogger(__name__)


def compute_tag(device: torch.device, amp: bool) -> str:
    """The precision a part runs in: bf16 autocast on CUDA changes its outputs."""
    return f"{device.type}-{'bf16' if amp and device.type == 'cuda' else 'fp32'}"


def _base_settings(method: Method, params: Params, device: torch.device) -> dict[str, Any]:
    mean, std = image_norm(method)
    return {"model": params.model.model_dump(mode="json"), "crop": params.model.img_size, "mean": list(mean),
            "std": list(std), "compute": compute_tag(device, params.train.amp)}


def trunk_producer(method: Method, params: Params, device: torch.device) -> tuple[str, dict[str, Any]]:
    """(key, description) of LoRAX's trunk: the backbone's tensors outside the adapted blocks, up to the branch."""
    net = method.net
    bb = net.backbone
    memo = bb.__dict__.setdefault("_lorax_trunk_hash", {})
    if net.branch_block not in memo:
        skip = tuple(bb.block_prefix(i) for i in range(net.branch_block, bb.depth))
        # parameters and persistent buffers: a non-persistent one may be filled lazily by the first forward
        trunk = {n: t for n, t in bb.model.state_dict(keep_vars=True).items() if not n.startswith(skip)}
        memo[net.branch_block] = hash_tensors(trunk).hexdigest()
    settings = {**_base_settings(method, params, device), "part": "trunk", "family": type(bb).__name__,
                "branch_block": int(net.branch_block), "tensors": memo[net.branch_block]}
    return producer_key(settings), settings


def _adapted_base_hash(method: Method) -> str:
    """sha256 of the frozen base tensors of the adapted blocks (their weights under the adapters), hashed once."""
    net = method.net
    bb = net.backbone
    memo = bb.__dict__.setdefault("_lorax_branch_hash", {})
    if net.branch_block not in memo:
        inside = tuple(bb.block_prefix(i) for i in range(net.branch_block, bb.depth))
        adapters = {id(p) for p in method.adapter_parameters()}
        base = {n: t for n, t in bb.model.state_dict(keep_vars=True).items()
                if n.startswith(inside) and id(t) not in adapters and ".lora_" not in n}
        memo[net.branch_block] = hash_tensors(base).hexdigest()
    return memo[net.branch_block]


def adapter_producer(method: Method, params: Params, device: torch.device, task: str) -> tuple[str, dict[str, Any]]:
    """(key, description) of task ``task``'s branch: its adapter's tensors and the adapted blocks' frozen base
    weights, on top of the trunk."""
    settings = {"part": "adapter", "task": task, "trunk": trunk_producer(method, params, device)[0],
                "blocks": _adapted_base_hash(method), "adapter": params.adapter.model_dump(mode="json")}
    return producer_key(settings, method.net.adapters.state_dict(task)), settings


def features_producer(method: Method, params: Params, device: torch.device) -> tuple[str, dict[str, Any]]:
    """(key, description) of a frozen backbone's pooled features (the probe)."""
    bb = method.base_backbone()
    if "_lorax_hash" not in bb.__dict__:  # the backbone is frozen: hashed once
        bb.__dict__["_lorax_hash"] = hash_tensors(bb.state_dict()).hexdigest()
    settings = {**_base_settings(method, params, device), "part": "features", "tensors": bb.__dict__["_lorax_hash"]}
    return producer_key(settings), settings


def _check_unread(ds: ManifestDataset, views: Views, df: Any, params: Params):
    """A ``before`` hook: rows none of whose views will be decoded have their files checked here instead."""
    def check(found: np.ndarray) -> None:
        verify_files(df.iloc[np.flatnonzero(found.reshape(-1, views.k).all(1))], params.data.follow_links)
    return check


def trunk_tokens(method: Method, params: Params, store: FeatureStore, ds: ManifestDataset, df: Any, views: Views,
                 device: torch.device, positions: np.ndarray | None = None, rank: int = 0, world: int = 1,
                 read: bool = True) -> torch.Tensor | None:
    """The trunk's tokens of the views at ``positions`` (default: all); the missing computed and stored first.
    Under DDP with a persistent store the ranks split the missing views (then call ``store.refresh``)."""
    key, describe = trunk_producer(method, params, device)
    pos = np.arange(len(views.ids)) if positions is None else np.asarray(positions)
    net, amp = method.net, autocast(params, device)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with amp:
            return net.trunk(x)

    def compute(missing: np.ndarray):
        mine = missing
        if store.persistent and world > 1:  # by id, not by place: a rank that looked later misses fewer views
            mine = missing[np.ascontiguousarray(views.ids[pos[missing], :8]).view("<u8")[:, 0] % world == rank]
        back = {int(s): i for i, s in enumerate(pos)}  # view slot -> position among the asked ids
        for slots, values in view_batches(fn, ds, views, pos[mine], params.eval.batch_size, device,
                                          params.train.num_workers, desc="trunk tokens"):
            yield np.array([back[int(s)] for s in slots]), values

    before = _check_unread(ds, views, df, params) if positions is None else None
    return store.get_or_compute(key, views.ids[pos], compute, describe, read=read, before=before)


def adapter_embeddings(method: Method, params: Params, store: FeatureStore, ds: ManifestDataset, df: Any,
                       views: Views, names: list[str], device: torch.device, desc: str = "embeddings",
                       files_checked: bool = False) -> torch.Tensor:
    """(views, len(names), D) embeddings of every view by each named adapter: stored ones read; the missing ones
    computed from the stored trunk tokens, one batched pass per group of views missing the same adapters.
    Rows none of whose views is decoded here have their files checked (``files_checked``: the caller just did)."""
    net, amp, ids = method.net, autocast(params, device), views.ids
    keys = [adapter_producer(method, params, device, t) for t in names]
    missing = np.stack([store.producer(k, d).found(ids) for k, d in keys], 1) == 0 if keys else \
        np.zeros((len(ids), 0), bool)
    if not files_checked:  # decoded: the views whose trunk tokens are computed below; the loaders check those rows
        decoded = missing.any(1) & ~store.producer(*trunk_producer(method, params, device)).found(ids)
        verify_files(df.iloc[np.flatnonzero(~decoded.reshape(-1, views.k).any(1))], params.data.follow_links)
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in np.flatnonzero(missing.any(1)):
        groups.setdefault(tuple(np.flatnonzero(missing[r]).tolist()), []).append(int(r))
    log.info("%s: %d views x %d adapters: %d stored, %d to compute in %d pass(es)", desc, len(ids), len(keys),
             int((~missing).sum()), int(missing.sum()), len(groups))
    chunk = params.eval.batch_size * views.k
    for cols, pos in groups.items():
        group = [names[j] for j in cols]
        for s in range(0, len(pos), chunk):
            part = np.asarray(pos[s:s + chunk])
            tok = trunk_tokens(method, params, store, ds, df, views, device, positions=part)
            with torch.no_grad(), amp:
                e = net.branch(tok.to(device), group).float().cpu()  # (G, B, D)
            for g, j in enumerate(cols):
                store.add(keys[j][0], ids[part], e[g])
    if not keys:
        return torch.zeros(len(ids), 0, net.embed_dim)
    return torch.stack([store.get(k, ids) for k, _ in keys], 1)


def frozen_features(method: Method, params: Params, store: FeatureStore, ds: ManifestDataset, df: Any,
                    views: Views, device: torch.device) -> torch.Tensor:
    """(views, D) pooled features of a frozen backbone (the probe), stored once per view."""
    key, describe = features_producer(method, params, device)
    amp = autocast(params, device)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with amp:
            return method.features(x)

    def compute(missing: np.ndarray):
        return view_batches(fn, ds, views, missing, params.eval.batch_size, device, params.train.num_workers,
                            desc="frozen features")
    return store.get_or_compute(key, views.ids, compute, describe, before=_check_unread(ds, views, df, params))


def crop_mean(t: torch.Tensor, k: int) -> torch.Tensor:
    """(rows * k, ...) -> (rows, ...): the mean over each row's views."""
    return t.view(-1, k, *t.shape[1:]).mean(1) if k > 1 else t
