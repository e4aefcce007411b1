"""A trained method over manifest rows: logits and super-features (from the embedding store and the trunk cache
where they hold them), one column of the accuracy matrix, the shortcut control.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lorax.config import Params
from lorax.continual import metrics as M
from lorax.continual.batches import autocast, image_norm, loader_for, resolve_device, to_device
from lorax.continual.embedding_store import EmbeddingStore, adapter_key, image_ids
from lorax.continual.methods import Method, logits_and_features
from lorax.continual.trunk_cache import TrunkCache, eval_ids, open_trunk_cache
from lorax.data.dataset import Resample, control_views
from lorax.data.manifest import abs_paths, verify_files
from lorax.utils.progress import timed

log = logging.getLogger(__name__)


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
    (:func:`~lorax.data.manifest.verify_files`). Logs its start and end (:func:`lorax.utils.progress.timed`)."""
    with timed(log, f"{desc}: {len(df)} images x {params.eval.crops} crops ({method.name})"):
        return _predict_logits(method, df, params, device, features, desc, store, resample)


def _predict_logits(method: Method, df: pd.DataFrame, params: Params, device: torch.device | None, features: bool,
                    desc: str, store: EmbeddingStore | None,
                    resample: Resample | None) -> tuple[np.ndarray, np.ndarray | None]:
    device = device or resolve_device(params.train.device)
    method.to(device).eval()
    if store is not None and uses_embedding_store(method):
        emb = _stored_embeddings(method, df, params, device, store, desc, resample)  # (N, T, D)
        logits = [method.net.classify(e.permute(1, 0, 2).to(device))[0].float().cpu()
                  for e in torch.split(emb, params.eval.batch_size)]
        out = torch.cat(logits).numpy() if logits else np.zeros((0, method.n_classes), np.float32)
        return out, (emb.reshape(len(emb), -1).numpy() if features else None)
    if store is not None and frozen_features(method):
        feats_all = _stored_frozen_features(method, df, params, device, store, desc, resample)  # (N, D)
        parts = [method.head(f.to(device)).float().cpu() for f in torch.split(feats_all, params.eval.batch_size)]
        out = torch.cat(parts).numpy() if parts else np.zeros((0, method.n_classes), np.float32)
        return out, (feats_all.numpy() if features else None)
    n_crops = params.eval.crops
    loader = loader_for(df, method, params, train=False, seed=0, device=device, n_crops=n_crops, resample=resample)
    logits, feats = [], []
    for x, _, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        x = to_device(x.flatten(0, 1) if x.dim() == 5 else x, device)
        with autocast(params, device):
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
    return method.frozen_task_adapters


def frozen_features(method: Method) -> bool:
    """The probe: a frozen backbone under a linear head, so its features of an image never change (kept once)."""
    return method.name == "probe" and not method.backbone_parameters() and isinstance(
        getattr(method, "head", None), torch.nn.Linear)


def _view(method: Method, params: Params, resample: Resample | None) -> dict:
    """What an embedding depends on besides the adapter and the pixels: backbone settings, the eval view."""
    from lorax.config import params_to_dict

    d = params_to_dict(params)
    mean, std = image_norm(method)
    view = {"model": d["model"], "adapter": d["adapter"], "crops": params.eval.crops, "mean": mean, "std": std}
    if resample is not None:  # only then: the as-is keys stay those of earlier runs
        view["resample"] = list(resample)
    return view


def _stored_frozen_features(method: Method, df: pd.DataFrame, params: Params, device: torch.device,
                            store: EmbeddingStore, desc: str, resample: Resample | None = None) -> torch.Tensor:
    """(N, D) frozen-backbone features of ``df``'s eval views (``eval.crops`` averaged): stored ones read, the
    rest computed once and stored (key: the backbone's settings and the view; no adapter)."""
    view = {k: v for k, v in _view(method, params, resample).items() if k != "adapter"}
    key, ids = adapter_key({}, {**view, "frozen": method.name}), image_ids(df)
    found, vals = store.lookup(key, ids)
    out = np.zeros((len(df), method.backbone.feature_dim), dtype=np.float32)
    if vals is not None:
        out[found] = vals[found]
    verify_files(df[found], params.data.follow_links)  # the others: in the loaders
    rows = np.flatnonzero(~found)
    log.info("%s: frozen features of %d images stored, %d to compute", desc, int(found.sum()), len(rows))
    if len(rows):
        out[rows] = _crop_means(method.features, df.iloc[rows], method, params, device, f"{desc}: frozen features",
                                resample).numpy()
        store.add(key, ids[rows], out[rows])
    return torch.from_numpy(out)


def adapter_keys(method: Method, params: Params, resample: Resample | None = None) -> list[str]:
    """The store key of every task's adapter (its tensors, the backbone and adapter settings, the eval view)."""
    view = _view(method, params, resample)
    if params.train.trunk_cache and method.net.branch_block > 0:  # embeddings from fp16 trunk tokens: kept apart
        view["trunk_tokens"] = "fp16"
    return [adapter_key(method.net.adapters.state_dict(t), view) for t in method.tasks]


def _stored_embeddings(method: Method, df: pd.DataFrame, params: Params, device: torch.device,
                       store: EmbeddingStore, desc: str, resample: Resample | None = None) -> torch.Tensor:
    """(N, T, D) embeddings of ``df``'s rows by every task's adapter: the stored ones read, the rest computed in
    one pass per group of rows missing the same adapters (old images: the newest adapter only), then stored."""
    ids, keys = image_ids(df), adapter_keys(method, params, resample)
    n, t = len(df), len(keys)
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
    log.info("%s: embeddings of %d images x %d adapters: %d stored, %d to compute in %d pass(es)", desc, n, t,
             int((~missing).sum()), int(missing.sum()), len(groups))
    trunk = open_trunk_cache(method, params, device) if groups else None  # also the control's resampled crops
    for cols, rows in groups.items():
        names = [method.tasks[j] for j in cols]
        if trunk is not None:
            got = _trunk_embeddings(method, df.iloc[rows], names, params, device, trunk, desc, resample)
        else:  # (G, B * crops, D) embeddings -> (rows, G, D)
            got = _crop_means(lambda x, names=names: method.net.embeddings(x, names).permute(1, 0, 2), df.iloc[rows],
                              method, params, device, f"{desc}: {len(names)} of {t} adapters", resample).numpy()
        emb[np.ix_(rows, list(cols))] = got
        for g, j in enumerate(cols):
            store.add(keys[j], ids[rows], got[:, g])
    return torch.from_numpy(emb)


def _trunk_embeddings(method: Method, df: pd.DataFrame, names: list[str], params: Params, device: torch.device,
                      trunk: TrunkCache, desc: str, resample: Resample | None = None) -> np.ndarray:
    """(rows, len(names), D) embeddings of the eval crops (``resample``: of the resized image) from cached trunk
    tokens (the missing ones computed and stored first; rows with every crop cached are not decoded, so their files
    are checked here)."""
    n_crops = params.eval.crops
    ids = eval_ids(df, params.model.img_size, n_crops, resample)
    missing = ~trunk.found(ids)
    need = missing.reshape(-1, n_crops).any(1)
    verify_files(df[~need], params.data.follow_links)
    if need.any():
        sub = np.flatnonzero(need)
        log.info("%s: trunk tokens of %d of %d images to compute (the rest cached)", desc, len(sub), len(df))
        loader = loader_for(df.iloc[sub], method, params, train=False, seed=0, device=device, n_crops=n_crops,
                            resample=resample)
        trunk.fill(method.net, _reindexed(loader, sub), ids, device, autocast(params, device),
                   desc=f"{desc}: trunk cache")
    parts, bs = [], params.eval.batch_size
    for start in tqdm(range(0, len(df), bs), desc=f"{desc}: {len(names)} adapters from the trunk cache",
                      leave=False, disable=None):
        tok = trunk.get(ids[start * n_crops:(start + bs) * n_crops]).to(device, non_blocking=True)
        with autocast(params, device):
            e = method.net.branch(tok, names)  # (G, B * crops, D)
        parts.append(_crop_mean(e.float().permute(1, 0, 2), n_crops).cpu())
    return torch.cat(parts).numpy()


def _crop_means(fn, df: pd.DataFrame, method: Method, params: Params, device: torch.device, desc: str,
                resample: Resample | None = None) -> torch.Tensor:
    """``fn`` (a batch of eval crops -> outputs, first dim B * crops) over ``df``'s eval views (``eval.crops``
    per image, ``resample``: of the resized image), averaged over each image's crops, on the host."""
    n_crops = params.eval.crops
    loader = loader_for(df, method, params, train=False, seed=0, device=device, n_crops=n_crops, resample=resample)
    parts = []
    for x, _, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        x = to_device(x.flatten(0, 1) if x.dim() == 5 else x, device)
        with autocast(params, device):
            parts.append(_crop_mean(fn(x).float(), n_crops).cpu())
    return torch.cat(parts)


def _reindexed(loader, rows: np.ndarray):
    """``loader``'s batches with positions in the loader's frame mapped back to ``rows``' frame."""
    for x, y, index in loader:
        yield x, y, torch.from_numpy(rows[index.numpy()])


def _crop_mean(t: torch.Tensor, n_crops: int) -> torch.Tensor:
    return t.view(-1, n_crops, *t.shape[1:]).mean(1) if n_crops > 1 else t


def val_rows(manifests: list[pd.DataFrame]) -> pd.DataFrame:
    """The val rows of the seen tasks, in task order: what one column of the accuracy matrix is measured on."""
    return pd.concat([m[m["split"] == "val"] for m in manifests], ignore_index=True)


def predict_verdict(method: Method, df: pd.DataFrame, params: Params, device: torch.device | None = None,
                    desc: str = "eval", store: EmbeddingStore | None = None, resample: Resample | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """Logits of ``df``'s rows and the model's verdict on them: ``(logits, fake probability, threshold)``, the last
    two None when the method decides by argmax (no ``verdict``; :mod:`lorax.continual.verdict`)."""
    logits, feats = predict_logits(method, df, params, device, features=getattr(method, "verdict", None) is not None,
                                   desc=desc, store=store, resample=resample)
    return (logits, *verdict_scores(method, feats))


def verdict_scores(method: Method, feats: np.ndarray | None) -> tuple[np.ndarray | None, float | None]:
    """``(fake probability, threshold)`` of the method's stored verdict on super-features ``feats``; ``(None,
    None)`` when it decides by argmax."""
    verdict = getattr(method, "verdict", None)
    if verdict is None:
        return None, None
    return verdict.fake_probability(feats), verdict.threshold


def score_val(val: pd.DataFrame, logits: np.ndarray, tasks: list[str], fake_score: np.ndarray | None = None,
              threshold: float | None = None) -> tuple[dict, pd.DataFrame]:
    """Metrics dict (one column of R) and the per-image table of ``val_rows``' logits (``fake_score`` /
    ``threshold``: the verdict of :func:`predict_verdict`)."""
    targets = val["class_id"].to_numpy()
    task_ids = val["task_index"].to_numpy()
    result = M.evaluate_logits(logits, targets, task_ids, len(tasks), fake_score, threshold)
    table = M.prediction_table([str(p) for p in abs_paths(val)], logits, targets, task_ids, task_names=tasks,
                               fake_score=fake_score, threshold=threshold)
    return result, table


def evaluate_controls(method: Method, val: pd.DataFrame, params: Params, device: torch.device | None = None,
                      store: EmbeddingStore | None = None, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """The shortcut controls of one evaluation, by name (:func:`lorax.data.dataset.control_views`): metrics of the
    same rows with every image resized by ``eval.resample_control`` (``resampled``) or re-encoded as JPEG of each
    ``eval.jpeg_control`` quality (``jpeg<Q>``) before cropping; ``{}`` when both are off; ``skip``: names already
    measured. Stored in the eval json as ``control``."""
    out = {}
    for name, view in control_views(params.eval.resample_control, params.eval.jpeg_control).items():
        if name in skip:
            continue
        logits, fake, thr = predict_verdict(method, val, params, device, desc=f"eval ({name})", store=store,
                                            resample=view)
        result, _ = score_val(val, logits, method.tasks, fake, thr)
        result.pop("confusion", None)
        out[name] = {**result, "scale": view[0], "filter": view[1]}
    return out
