"""A trained method over manifest rows: logits and super-features (its frozen parts' outputs through the feature
store), one column of the accuracy matrix, the shortcut control.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lorax.config import Params
from lorax.continual import metrics as M
from lorax.continual.batches import autocast, dataset_for, loader_for, resolve_device, to_device
from lorax.continual.frozen_parts import adapter_embeddings, crop_mean
from lorax.continual.frozen_parts import frozen_features as stored_features
from lorax.continual.methods import Method, logits_and_features
from lorax.continual.trace_methods import uses_traces
from lorax.continual.trace_parts import native_dataset, trace_embeddings, trace_eval_views
from lorax.data.dataset import Resample, control_views
from lorax.data.manifest import abs_paths
from lorax.features import open_store
from lorax.features.store import FeatureStore
from lorax.features.views import eval_views
from lorax.utils.progress import timed

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_logits(method: Method, df: pd.DataFrame, params: Params, device: torch.device | None = None,
                   features: bool = False, desc: str = "eval",
                   store: FeatureStore | None = None,
                   resample: Resample | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (and optionally the super-features) of every row of ``df`` with eval transforms: the centre crop, or
    the average over ``eval.crops`` fixed crops (the crop policy of :class:`lorax.serving.predict.Predictor`).
    ``resample``: (scale, filter), every image resized before cropping (the shortcut control).

    A method with frozen parts (LoRAX's trunk and adapters, the probe's backbone) reads what the feature store
    (``store``, default: the ``cache:`` settings' store) has of each view and computes only the rest
    (:mod:`lorax.continual.frozen_parts`); rows it has everything of are not decoded, but their files are still
    checked against the manifest. Logs its start and end (:func:`lorax.utils.progress.timed`)."""
    with timed(log, f"{desc}: {len(df)} images x {params.eval.crops} crops ({method.name})"):
        return _predict_logits(method, df, params, device, features, desc, store, resample)


def _predict_logits(method: Method, df: pd.DataFrame, params: Params, device: torch.device | None, features: bool,
                    desc: str, store: FeatureStore | None,
                    resample: Resample | None) -> tuple[np.ndarray, np.ndarray | None]:
    device = device or resolve_device(params.train.device)
    method.to(device).eval()
    n_crops, bs = params.eval.crops, params.eval.batch_size
    if uses_traces(method):
        store = store if store is not None else open_store(params.cache)
        return _trace_logits(method, df, params, device, features, desc, store, resample)
    if method.frozen_task_adapters or frozen_features(method):
        store = store if store is not None else open_store(params.cache)
        ds = dataset_for(df, method, params, False, 0, n_crops, resample)
        views = eval_views(df, params.model.img_size, n_crops, resample)
        if method.frozen_task_adapters:  # (N, T, D) embeddings of the crops' mean -> the head
            emb = crop_mean(adapter_embeddings(method, params, store, ds, df, views, method.tasks, device, desc),
                            n_crops)
            parts = [method.net.classify(e.permute(1, 0, 2).to(device))[0].float().cpu()
                     for e in torch.split(emb, bs)]
            feats = emb.reshape(len(emb), -1)
        else:  # the probe: its frozen backbone's features -> its head
            feats = crop_mean(stored_features(method, params, store, ds, df, views, device), n_crops)
            parts = [method.head(f.to(device)).float().cpu() for f in torch.split(feats, bs)]
        out = torch.cat(parts).numpy() if parts else np.zeros((0, method.n_classes), np.float32)
        return out, (feats.numpy() if features else None)
    loader = loader_for(df, method, params, train=False, seed=0, device=device, n_crops=n_crops, resample=resample)
    logits, feats = [], []
    for x, _, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        x = to_device(x.flatten(0, 1) if x.dim() == 5 else x, device)
        with autocast(params, device):
            if features:  # one backbone pass for both (exemplar selection, the open-set calibration)
                out, f = logits_and_features(method, x)
                feats.append(crop_mean(f.float(), n_crops))
            else:
                out = method(x)[0]
            logits.append(crop_mean(out.float(), n_crops))
    # one device -> host copy at the end: no per-batch sync
    return torch.cat(logits).cpu().numpy(), (torch.cat(feats).cpu().numpy() if features else None)


def _trace_logits(method: Method, df: pd.DataFrame, params: Params, device: torch.device, features: bool, desc: str,
                  store: FeatureStore, resample: Resample | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A trace method (:mod:`lorax.continual.trace_methods`): every expert's embedding of each row's patch grid at
    native resolution from the store (for ``lorax+trace`` beside every adapter's embedding of its crops) -> the
    head. The super-feature is the per-task slices in task order (adapter, expert)."""
    native = native_dataset(df, params)
    emb = trace_embeddings(method, params, store, native, df, trace_eval_views(df, params, resample), method.tasks,
                           device, f"{desc} (trace)")  # (N, T, dim)
    if method.frozen_task_adapters:  # lorax+trace: (N, T, adapter dim) beside
        ds = dataset_for(df, method, params, False, 0, params.eval.crops, resample)
        views = eval_views(df, params.model.img_size, params.eval.crops, resample)
        ada = crop_mean(adapter_embeddings(method, params, store, ds, df, views, method.tasks, device, desc,
                                           files_checked=True), params.eval.crops)
        emb = torch.cat([ada, emb], -1)
        parts = [method.net.classify(e.permute(1, 0, 2).to(device))[0].float().cpu()
                 for e in torch.split(emb, params.eval.batch_size)]
    else:
        parts = [method.classify(e.to(device))[0].float().cpu() for e in torch.split(emb, params.eval.batch_size)]
    out = torch.cat(parts).numpy() if parts else np.zeros((0, method.n_classes), np.float32)
    return out, (emb.reshape(len(emb), -1).numpy() if features else None)


def frozen_features(method: Method) -> bool:
    """The probe: a frozen backbone under a linear head, so its features of an image never change (kept once)."""
    return method.name == "probe" and not method.backbone_parameters() and isinstance(
        getattr(method, "head", None), torch.nn.Linear)


def val_rows(manifests: list[pd.DataFrame]) -> pd.DataFrame:
    """The val rows of the seen tasks, in task order: what one column of the accuracy matrix is measured on."""
    return pd.concat([m[m["split"] == "val"] for m in manifests], ignore_index=True)


def predict_verdict(method: Method, df: pd.DataFrame, params: Params, device: torch.device | None = None,
                    desc: str = "eval", store: FeatureStore | None = None, resample: Resample | None = None
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


def set_scores(method: Method, logits: np.ndarray, feats: np.ndarray | None
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(label scores (N, T+1), thresholds)`` of the method's prediction sets (:mod:`lorax.continual.conformal`)
    on rows with ``logits`` and super-features ``feats``; ``(None, None)`` when it has none."""
    sets = getattr(method, "sets", None)
    if sets is None:
        return None, None
    return sets.scores(M.softmax(logits), feats), sets.thresholds


def score_val(val: pd.DataFrame, logits: np.ndarray, tasks: list[str], fake_score: np.ndarray | None = None,
              threshold: float | None = None,
              sets: tuple[np.ndarray | None, np.ndarray | None] = (None, None)) -> tuple[dict, pd.DataFrame]:
    """Metrics dict (one column of R) and the per-image table of ``val_rows``' logits (``fake_score`` /
    ``threshold``: the verdict of :func:`predict_verdict`; ``sets``: :func:`set_scores`)."""
    targets = val["class_id"].to_numpy()
    task_ids = val["task_index"].to_numpy()
    result = M.evaluate_logits(logits, targets, task_ids, len(tasks), fake_score, threshold, *sets)
    table = M.prediction_table([str(p) for p in abs_paths(val)], logits, targets, task_ids, task_names=tasks,
                               fake_score=fake_score, threshold=threshold, set_scores=sets[0],
                               set_thresholds=sets[1])
    return result, table


def evaluate_controls(method: Method, val: pd.DataFrame, params: Params, device: torch.device | None = None,
                      store: FeatureStore | None = None, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """The shortcut controls of one evaluation, by name (:func:`lorax.data.dataset.control_views`): metrics of the
    same rows with every image resized by ``eval.resample_control`` (``resampled``) or re-encoded as JPEG of each
    ``eval.jpeg_control`` quality (``jpeg<Q>``) before cropping; ``{}`` when both are off; ``skip``: names already
    measured. Stored in the eval json as ``control``."""
    out = {}
    for name, view in control_views(params.eval.resample_control, params.eval.jpeg_control).items():
        if name in skip:
            continue
        sets = getattr(method, "sets", None)
        logits, feats = predict_logits(method, val, params, device, desc=f"eval ({name})", store=store,
                                       resample=view, features=getattr(method, "verdict", None) is not None or (
                                           sets is not None and sets.needs_features))
        result, _ = score_val(val, logits, method.tasks, *verdict_scores(method, feats),
                              sets=set_scores(method, logits, feats))
        result.pop("confusion", None)
        out[name] = {**result, "scale": view[0], "filter": view[1]}
    return out
