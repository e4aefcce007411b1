"""The detector's frozen trunk as a producer of the feature store (:mod:`lorax.features.store`).

The trunk (:mod:`lorax.detect.trunk`: the stem, the blocks below ``start``, the pixel and level features under
them) of one backbone is one producer (:func:`trunk_producer`): its key hashes the model settings, ``start``, the
crop size, the normalisation, the precision and every frozen tensor the trunk runs, so another backbone, other
weights or another ``start`` is another producer. An entry is one view of one image, named by
:func:`lorax.features.views.view_id` from the image's sha256 and:

* a training view (:func:`train_plan`, ``detect.views`` per image): its crop box, its flip and the augmentation
  operations applied to it (:meth:`RobustAug.draw`), all drawn from a generator seeded by the image's content
  digest, the view index and the run's seed. An image's views are the same in every run, and adding images to a
  frame adds their entries without changing any other image's;
* an evaluation view (:func:`eval_plan`): one of the fixed crops (:func:`lorax.data.dataset.crop_boxes`) and the
  name of the test-time perturbation applied to it (:func:`lorax.detect.trunk.perturbation`).

Boxes are named from the manifest's width and height, so naming a view decodes nothing. The value of an entry is
the view's tokens entering block ``start`` (L x D) followed by its frozen features (P), float32, as computed.
:class:`TrunkFeatures` returns a frame's views as a :class:`CachedSet`: the stored ones read, only the missing ones
decoded and encoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lorax.data.dataset import ManifestDataset, crop_boxes, to_tensor
from lorax.data.manifest import verify_files
from lorax.detect.config import DetectConfig
from lorax.detect.detector import Detector, build_detector
from lorax.detect.trunk import CachedSet, RobustAug, encode_trunk, perturbation, trunk_start
from lorax.features.store import FeatureStore, hash_tensors, producer_key
from lorax.features.views import content_seeds, image_digests, view_id
from lorax.models.config import ModelConfig

__all__ = ["TrunkFeatures", "ViewPlan", "aug_of", "eval_plan", "train_plan", "trunk_producer"]

log = logging.getLogger(__name__)


def aug_of(cfg: DetectConfig) -> RobustAug:
    """The training views' augmentation: blur and JPEG each with ``detect.aug_prob`` (sigma ~ U[0, 3], quality ~
    U{30..100}, as CNNSpot / CLIP-MoLE), down-and-up scaling with ``detect.aug_scale_prob`` (factor ~ U[0.5, 1])."""
    return RobustAug(blur_prob=cfg.aug_prob, jpeg_prob=cfg.aug_prob, scale_prob=cfg.aug_scale_prob)


def trunk_producer(det: Detector, model_cfg: ModelConfig, start: int,
                   device: torch.device) -> tuple[str, dict[str, Any]]:
    """(key, description) of the trunk of ``det`` up to block ``start``: the model settings, the normalisation,
    the precision, and the hash of every tensor of the backbone outside blocks ``start..`` (the stem, the blocks
    below, the pixel features')."""
    bb = det.backbone
    skip = tuple(f"model.{bb.block_prefix(i)}" for i in range(start, bb.depth))
    frozen = {n: t for n, t in bb.state_dict(keep_vars=True).items() if not n.startswith(skip)}
    settings = {"part": "detector trunk", "model": model_cfg.model_dump(mode="json"), "family": type(bb).__name__,
                "start": int(start), "crop": int(model_cfg.img_size), "mean": [float(v) for v in bb.info.mean],
                "std": [float(v) for v in bb.info.std], "compute": f"{torch.device(device).type}-fp32",
                "value": "tokens entering block start (L*D), then the frozen features (P)",
                "tensors": hash_tensors(frozen).hexdigest()}
    return producer_key(settings), settings


@dataclass(frozen=True)
class ViewPlan:
    """The views of a frame, ``k`` per row in row order: view ``i`` is of row ``rows[i]``. Training views carry
    their crop seed and augmentation operations; evaluation views the perturbation's name (None: clean)."""

    ids: np.ndarray  # (N, 32) uint8
    rows: np.ndarray  # (N,)
    k: int
    seeds: np.ndarray | None = None  # (N,) crop seeds (training views)
    ops: tuple[list[list[Any]], ...] = ()  # per view: RobustAug.draw's operations (training views)
    perturb: str | None = None


def _sizes(df: pd.DataFrame) -> zip:
    return zip(image_digests(df), df["width"].astype(int), df["height"].astype(int), strict=True)


def _ids(items: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(items), dtype=np.uint8).reshape(-1, 32).copy()


def train_plan(df: pd.DataFrame, ds: ManifestDataset, k: int, aug: RobustAug, seed: int) -> ViewPlan:
    """``k`` training views per row of ``df`` (``ds``: its train dataset, which draws the box and flip): view ``j``
    of an image is drawn from its content digest, ``j`` and ``seed`` only."""
    base = content_seeds(image_digests(df), k)
    items, rows, seeds, ops = [], [], [], []
    for r, (d, w, h) in enumerate(_sizes(df)):
        for j in range(k):
            rng = np.random.default_rng([int(base[r, j]), int(seed) % 2**63])
            crop_seed = int(rng.integers(0, 2**62))
            drawn = aug.draw(rng)
            (box,), flip = ds._boxes(int(w), int(h), np.random.default_rng(crop_seed), ds.paths[r])
            view = {"box": [int(v) for v in box], "flip": bool(flip), **({"aug": drawn} if drawn else {})}
            items.append(view_id(d, view))
            rows.append(r)
            seeds.append(crop_seed)
            ops.append(drawn)
    return ViewPlan(_ids(items), np.asarray(rows, dtype=int), k, np.asarray(seeds, dtype=np.int64), tuple(ops))


def eval_plan(df: pd.DataFrame, crop: int, n_crops: int, perturb: str | None = None) -> ViewPlan:
    """The ``n_crops`` fixed evaluation crops of every row of ``df``, perturbed by ``perturb`` (a name)."""
    extra = {"perturb": perturb} if perturb else {}
    items, rows = [], []
    for r, (d, w, h) in enumerate(_sizes(df)):
        for box in crop_boxes(int(w), int(h), crop, n_crops):
            items.append(view_id(d, {"box": [int(v) for v in box], "flip": False, **extra}))
            rows.append(r)
    return ViewPlan(_ids(items), np.asarray(rows, dtype=int), n_crops, perturb=perturb)


class _Pixels(torch.utils.data.Dataset):
    """Item -> (normalised crops (n, 3, S, S), their positions in the plan (n,)): one training view, or every
    evaluation crop of one row (decoded once)."""

    def __init__(self, ds: ManifestDataset, plan: ViewPlan, items: list[int], mean: Any, std: Any) -> None:
        self.ds, self.plan, self.items, self.mean, self.std = ds, plan, items, mean, std
        self.fn = perturbation(plan.perturb) if plan.perturb else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item, plan = self.items[i], self.plan
        if plan.seeds is not None:
            (img,) = self.ds.load(int(plan.rows[item]), seed=int(plan.seeds[item]))
            crops, pos = [RobustAug.apply(np.ascontiguousarray(img), plan.ops[item])], [item]
        else:
            crops = [np.ascontiguousarray(a) for a in self.ds.load(item)]
            crops = [self.fn(a) for a in crops] if self.fn is not None else crops
            pos = [item * plan.k + c for c in range(len(crops))]
        return torch.stack([to_tensor(a, self.mean, self.std) for a in crops]), torch.as_tensor(pos)


class TrunkFeatures:
    """The detector trunk's outputs of manifest frames' views, read from ``store`` or computed into it.

    ``encoder``: the frozen backbone (the probe detector of ``model_cfg``); ``start``: the trunk's end
    (:func:`trunk_start` of ``detect.blocks``); ``key``: its producer; ``computed``: views this object encoded."""

    def __init__(self, store: FeatureStore, model_cfg: ModelConfig, detect_cfg: DetectConfig,
                 device: torch.device | str = "cpu", batch_size: int = 32, follow_links: bool = False,
                 num_workers: int = 0) -> None:
        self.store, self.model_cfg, self.cfg = store, model_cfg, detect_cfg
        self.device, self.batch_size = torch.device(device), batch_size
        self.follow_links, self.num_workers = follow_links, num_workers
        self.encoder = build_detector(model_cfg, detect_cfg, "probe").eval()
        self.start = trunk_start(self.encoder, detect_cfg.blocks)
        self.key, self.describe = trunk_producer(self.encoder, model_cfg, self.start, self.device)
        self.encoder.to(self.device)
        bb = self.encoder.backbone
        self.pre_dim = bb.spectrum_dim + 2 * bb.embed_dim * sum(1 for b in bb.levels if b < self.start)
        self.computed = 0
        self._verified: set[tuple[str, str, str]] = set()

    def train(self, df: pd.DataFrame, seed: int) -> CachedSet:
        """``detect.views`` augmented training views per image of ``df``."""
        ds = ManifestDataset(df, train=True, crop=self.model_cfg.img_size, follow_links=self.follow_links)
        return self._read(df, ds, train_plan(df, ds, self.cfg.views, aug_of(self.cfg), seed))

    def eval(self, df: pd.DataFrame, perturb: str | None = None, n_crops: int | None = None) -> CachedSet:
        """The fixed evaluation crops (``n_crops``, default ``detect.eval_crops``) of every image of ``df``,
        perturbed by the named ``perturb`` (:func:`lorax.detect.trunk.perturbation`; None: clean)."""
        n = n_crops or self.cfg.eval_crops
        ds = ManifestDataset(df, train=False, crop=self.model_cfg.img_size, n_crops=n,
                             follow_links=self.follow_links)
        return self._read(df, ds, eval_plan(df, self.model_cfg.img_size, n, perturb))

    def _read(self, df: pd.DataFrame, ds: ManifestDataset, plan: ViewPlan) -> CachedSet:
        if not len(df):
            raise ValueError("no crops to encode: the manifest frame is empty")
        values = self.store.get_or_compute(self.key, plan.ids, lambda missing: self._compute(ds, plan, missing),
                                           self.describe, before=lambda found: self._check(df, plan, found))
        width = values.shape[1] - self.pre_dim
        tokens = values[:, :width].view(len(values), -1, self.encoder.backbone.embed_dim)
        labels = (df["class_id"].to_numpy() % 2).astype(int)
        return CachedSet(tokens, values[:, width:], labels[plan.rows], plan.rows.copy())

    def _check(self, df: pd.DataFrame, plan: ViewPlan, found: np.ndarray) -> None:
        """Rows whose views are all stored are not decoded: their files are checked against the manifest here."""
        keys = list(zip(df["root"].astype(str), df["path"].astype(str), df["sha256"].astype(str), strict=True))
        rows = [r for r in np.flatnonzero(found.reshape(-1, plan.k).all(1)) if keys[r] not in self._verified]
        verify_files(df.iloc[rows], self.follow_links)
        self._verified.update(keys[r] for r in rows)

    def _compute(self, ds: ManifestDataset, plan: ViewPlan, missing: np.ndarray):
        from tqdm.auto import tqdm

        per_view = plan.seeds is not None
        items = missing.tolist() if per_view else sorted(set((missing // plan.k).tolist()))
        log.info("detector trunk %s: %d of %d views to compute", self.key[:8], len(missing), len(plan.ids))
        info = self.encoder.backbone.info
        loader = torch.utils.data.DataLoader(_Pixels(ds, plan, items, info.mean, info.std),
                                             batch_size=max(1, self.batch_size // (1 if per_view else plan.k)),
                                             num_workers=self.num_workers)
        self.encoder.eval()
        for x, pos in tqdm(loader, desc="detector trunk", leave=False, disable=None):
            pos = pos.reshape(-1).numpy()
            keep = np.isin(pos, missing)
            tokens, pre = encode_trunk(self.encoder, x.flatten(0, 1)[torch.from_numpy(keep)].to(self.device),
                                       self.start)
            if pre.shape[1] != self.pre_dim:
                raise RuntimeError(f"detector trunk: frozen features of width {pre.shape[1]}, expected "
                                   f"{self.pre_dim}")
            self.computed += int(keep.sum())
            yield pos[keep], torch.cat([tokens.flatten(1), pre], 1).cpu()
