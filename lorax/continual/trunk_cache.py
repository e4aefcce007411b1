"""Frozen-trunk cache (``train.trunk_cache``): the tokens of the blocks below the first adapter, kept on disk.

With ``adapter.blocks: last_k`` the blocks before the first adapted one (``LoRAXNet.branch_block``) see no adapter,
so their output tokens for a given crop are the same for every task, epoch, run and evaluation. At real resolution
they are most of the cost (9 of 12 ViT-S/14 blocks at 224 px), so they are computed once per fixed crop and stored;
a training step then runs only the adapted blocks (``LoRAXNet.forward(tokens, old_emb, from_trunk=True)``).

Addressing: the folder is a hash of everything the tokens depend on (the trunk's own tensors -- stem and blocks
below the branch --, the backbone's name and kwargs, the crop size, the normalisation, ``branch_block`` and the
compute precision); an entry's id hashes the image's ``sha256`` (the file bytes the loaders verify), its size, the
crop box and the flip. A stale entry therefore cannot be read. Storage: the project's one shard store
(:class:`lorax.continual.shards.ShardStore`), tokens as float16 read row by row from memory-mapped shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lorax.continual.shards import ShardStore, hash_tensors

log = logging.getLogger(__name__)

FORMAT = 1
FLUSH_BYTES = 256 * 2**20  # tokens kept in memory before a shard is written while filling


# -- keys --------------------------------------------------------------------------------------------------------
def compute_tag(device: torch.device, amp: bool) -> str:
    """The precision the trunk runs in (``trainer._autocast``): bf16 autocast on CUDA changes the tokens."""
    return f"{device.type}-{'bf16' if amp and device.type == 'cuda' else 'fp32'}"


def _trunk_tensors_hash(net: Any) -> str:
    """sha256 (:func:`~lorax.continual.shards.hash_tensors`) of every backbone tensor outside the adapted blocks
    (stem, trunk blocks, tokens, norms); kept on the backbone once computed."""
    bb = net.backbone
    memo = bb.__dict__.setdefault("_lorax_trunk_hash", {})
    if net.branch_block not in memo:
        skip = tuple(bb.block_prefix(i) for i in range(net.branch_block, bb.depth))
        # parameters and persistent buffers: a non-persistent buffer may be filled lazily by the first forward
        # (ConViT's rel_indices), so the key would depend on whether the model had run yet
        trunk = {n: t for n, t in bb.model.state_dict(keep_vars=True).items() if not n.startswith(skip)}
        memo[net.branch_block] = hash_tensors(trunk).hexdigest()
    return memo[net.branch_block]


def settings_key(net: Any, crop: int, mean: tuple[float, ...], std: tuple[float, ...], compute: str,
                 kwargs: dict[str, Any] | None = None) -> str:
    """The folder of one trunk: a hash of everything its tokens depend on besides the crop's pixels."""
    bb = net.backbone
    settings = {"format": FORMAT, "family": type(bb).__name__, "backbone": bb.info.name, "kwargs": kwargs or {},
                "crop": int(crop), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
                "branch_block": int(net.branch_block), "compute": compute, "tensors": _trunk_tensors_hash(net),
                "levels": [int(i) for i in bb.levels if i < net.branch_block]}  # extra rows: LoRAXNet.trunk
    if bb.spectrum is not None:  # only then: the keys of trunks without it stay those of earlier runs
        settings["spectrum"] = [bb.spectrum.grid, bb.spectrum.sigma]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


def view_ids(sha256: list[str], sizes: list[tuple[int, int]], boxes: list[tuple[int, int, int, int]],
             flips: list[bool]) -> np.ndarray:
    """(N, 32) uint8 ids of crops: image content hash, its size, the crop box, the flip."""
    out = np.empty((len(sha256), 32), dtype=np.uint8)
    for i, (sha, (w, h), box, flip) in enumerate(zip(sha256, sizes, boxes, flips, strict=True)):
        raw = bytes.fromhex(sha) + struct.pack("<6iB", int(w), int(h), *(int(b) for b in box), int(bool(flip)))
        out[i] = np.frombuffer(hashlib.sha256(raw).digest(), dtype=np.uint8)
    return out


def _hex(df: pd.DataFrame) -> list[str]:
    from lorax.continual.embedding_store import image_ids

    image_ids(df)  # one clear line when the sha256 column is missing or not 64 hex digits
    return df["sha256"].astype(str).tolist()


def content_seeds(df: pd.DataFrame, crops: int) -> torch.Tensor:
    """(rows, crops) crop seeds from each image's sha256 and the crop index (used with the trunk cache): an image
    gets the same K crops in every task, run and process, so its trunk tokens are computed once."""
    seeds = [[int.from_bytes(hashlib.sha256(f"{sha}:{k}".encode()).digest()[:8], "little") & (2**62 - 1)
              for k in range(crops)] for sha in _hex(df)]
    return torch.tensor(seeds, dtype=torch.int64).reshape(len(df), crops)


def train_ids(ds: Any, df: pd.DataFrame, seeds: torch.Tensor) -> np.ndarray:
    """Ids of the fixed training crops, slot ``row * K + k``: the box and flip the dataset draws for ``seeds[row,
    k]`` (its own ``_boxes``), from the manifest's width and height, so no image is decoded to know them."""
    sha, k = _hex(df), seeds.shape[1]
    sizes = list(zip(df["width"].astype(int), df["height"].astype(int), strict=True))
    s_sha, s_size, s_box, s_flip = [], [], [], []
    for r in range(len(df)):
        w, h = sizes[r]
        for j in range(k):
            boxes, flip = ds._boxes(w, h, np.random.default_rng(int(seeds[r, j])), ds.paths[r])
            s_sha.append(sha[r]), s_size.append((w, h)), s_box.append(boxes[0]), s_flip.append(flip)
    return view_ids(s_sha, s_size, s_box, s_flip)


def eval_ids(df: pd.DataFrame, crop: int, n_crops: int, resample: tuple[float, str] | None = None) -> np.ndarray:
    """Ids of the eval crops (:func:`lorax.data.dataset.crop_boxes`), ``row * n_crops + j``. ``resample``: the crops
    of the image resized first (the shortcut control): its own content id (file hash + scale + filter), the size
    :func:`lorax.data.dataset.resample_array` gives."""
    from lorax.data.dataset import crop_boxes, resampled_size

    s_sha, s_size, s_box = [], [], []
    for sha, w, h in zip(_hex(df), df["width"].astype(int), df["height"].astype(int), strict=True):
        if resample is not None:
            scale, filt = resample
            w, h = resampled_size(w, h, scale)
            sha = hashlib.sha256(f"{sha}|resample|{float(scale)!r}|{filt}".encode()).hexdigest()
        for box in crop_boxes(w, h, crop, n_crops):
            s_sha.append(sha), s_size.append((w, h)), s_box.append(box)
    return view_ids(s_sha, s_size, s_box, [False] * len(s_sha))


# -- storage -----------------------------------------------------------------------------------------------------
class TrunkCache(ShardStore):
    """Trunk tokens by crop id in one settings folder (a :class:`~lorax.continual.shards.ShardStore` of float16
    ``tokens``), and ``fill``, which computes and stores the trunk of what a loader yields."""

    def __init__(self, root: str | Path, key: str, verify: bool = True) -> None:
        super().__init__(Path(root) / key, "tokens", half=True, verify=verify)

    def add(self, ids: np.ndarray, tokens: torch.Tensor | np.ndarray) -> None:
        try:
            super().add(ids, tokens)
        except OSError as e:
            raise ValueError(f"train.trunk_cache_dir: cannot write the trunk cache under {self.dir.parent} "
                             f"({e.strerror or e}); point it at a writable folder or set train.trunk_cache: false"
                             ) from None

    @torch.no_grad()
    def fill(self, net: Any, loader: Any, ids: np.ndarray, device: torch.device, autocast: Any,
             desc: str = "trunk cache") -> int:
        """Compute the trunk of what ``loader`` yields and store it. ``loader`` gives ``(images, _, index)`` with
        images (B, C, H, W) or (B, n, C, H, W); ``ids`` maps ``index * n + j`` to crop ids. Returns crops added."""
        from tqdm.auto import tqdm

        was_training = net.training
        net.eval()
        added, pend_ids, pend_tok, pend_bytes = 0, [], [], 0
        for x, _, index in tqdm(loader, desc=desc, leave=False, disable=None):
            n = x.shape[1] if x.dim() == 5 else 1
            x = x.flatten(0, 1) if x.dim() == 5 else x
            with autocast:
                tok = net.trunk(x.to(device, non_blocking=True))
            rows = (index.view(-1, 1) * n + torch.arange(n).view(1, -1)).reshape(-1).numpy()
            pend_ids.append(ids[rows])
            pend_tok.append(tok.float().cpu())
            pend_bytes += tok.numel() * 2
            if pend_bytes >= FLUSH_BYTES:
                self.add(np.concatenate(pend_ids), torch.cat(pend_tok))
                added, pend_ids, pend_tok, pend_bytes = added + sum(len(p) for p in pend_ids), [], [], 0
        if pend_ids:
            self.add(np.concatenate(pend_ids), torch.cat(pend_tok))
            added += sum(len(p) for p in pend_ids)
        net.train(was_training)
        return added


class TokenSlotDataset(Dataset):
    """Slot ``row * K + k`` -> (its cached trunk tokens, class id, slot): the training batches of the cached path."""

    def __init__(self, cache: TrunkCache, ids: np.ndarray, class_ids: np.ndarray) -> None:
        self.cache, self.ids, self.class_ids = cache, ids, class_ids
        self.k = len(ids) // len(class_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, slot: int) -> tuple[torch.Tensor, int, int]:
        return self.cache.one(self.ids[int(slot)]), int(self.class_ids[int(slot) // self.k]), int(slot)

    def __getstate__(self) -> dict:  # worker processes re-open the memory maps instead of copying the tokens
        return {"root": self.cache.dir.parent, "key": self.cache.dir.name, "ids": self.ids,
                "class_ids": self.class_ids}

    def __setstate__(self, state: dict) -> None:
        self.__init__(TrunkCache(state["root"], state["key"], verify=False), state["ids"], state["class_ids"])


def wants_trunk_cache(method: Any, params: Any) -> bool:
    """On when ``train.trunk_cache`` is set, the method is LoRAX and its adapters leave a frozen trunk."""
    if not params.train.trunk_cache:
        return False
    if not method.frozen_task_adapters:
        log.info("train.trunk_cache: method %s has no frozen trunk under per-task adapters; not used", method.name)
        return False
    if method.net.branch_block == 0:
        log.info("train.trunk_cache: adapter.blocks %s leaves no frozen trunk (adapters from block 0); not used",
                 params.adapter.blocks)
        return False
    return True


def open_trunk_cache(method: Any, params: Any, device: torch.device) -> TrunkCache | None:
    """The trunk cache of this model and settings under ``train.trunk_cache_dir``, or None when not used."""
    if not wants_trunk_cache(method, params):
        return None
    bb = method.net.backbone
    key = settings_key(method.net, params.model.img_size, bb.info.mean, bb.info.std,
                       compute_tag(device, params.train.amp), params.model.kwargs)
    return TrunkCache(params.train.trunk_cache_dir, key)
