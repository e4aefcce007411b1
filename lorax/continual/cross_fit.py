"""Cross-fitted heads (``continual.cross_fit: k``; 0 = off): the head refit, the verdict and the prediction sets of a
task fitted on out-of-fold features of its newest producer.

The newest task's adapter (``lorax``), trace expert (``trace``) or both (``lorax+trace``) trained on the rows the
head is then fitted on, so its slice of their super-features is optimistic: more separable than on any image it
never saw, and a head, verdict threshold or set threshold fitted there expects more than the model delivers. With
``k >= 2``, after the task's normal training:

* the head's rows (the task's train rows + the exemplar memory) are split into ``k`` folds by
  :func:`lorax.data.groups.row_groups` with the verdict's fold rule (:func:`lorax.continual.verdict._folds`), so
  crops of one photo or one prompt's images never straddle folds;
* for each fold a fresh copy of the task (the previous state plus the new task, the same initialisation seed, the
  same training seed, settings and feature store) trains on the other folds, then computes the held-out fold's
  super-features through the feature store; its newest slice replaces the in-sample newest slice of those rows;
* the old slices stay the full model's (those adapters / experts are frozen and identical in every copy).

**Memory rows are in the folds too**: the newest producer trained on them as much as on the task's own rows, so
their newest slice is cross-fitted the same way (a fold copy replays only the memory rows of its training folds).
Their old slices still come from the earlier producers that trained on them in their own task; undoing that would
mean re-training old tasks, which this does not do.

The copies' producers have their own tensors, hence their own feature-store keys (:func:`newest_keys`): nothing
they compute is stored under the final producer's key. Only the head / verdict / sets fit changes: the model that
is saved, evaluated and served is the full-data one, bit for bit what ``cross_fit: 0`` trains. Cost: ``k``
trainings on ``(k - 1) / k`` of the rows (about ``k - 1`` times the task's training), reported per task in the
state info (``cross_fit_seconds_per_task``) and logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import pandas as pd

    from lorax.config import Params
    from lorax.continual.methods import Method
    from lorax.features.store import FeatureStore

log = logging.getLogger(__name__)

# (training rows, scratch folder for its epoch checkpoints) -> the trained copy of the task
TrainCopy = Callable[["pd.DataFrame", Path], "Method"]


@dataclass
class CrossFit:
    """What a cross-fit made: the out-of-fold newest slice of every row (in the rows' order), each row's fold, and
    per fold copy the rows it trained on, its newest producer's store keys and tensors (for checks)."""

    newest: np.ndarray  # (N, w) the newest task's slice of each row, from the copy that never trained on it
    fold: np.ndarray  # (N,) the fold of each row
    k: int
    train_index: list[np.ndarray] = field(default_factory=list)  # rows (positions) each copy trained on
    keys: list[list[str]] = field(default_factory=list)  # each copy's newest producer key(s) in the store
    tensors: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)  # each copy's newest groups
    seconds_per_fold: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return round(float(sum(self.seconds_per_fold)), 2)

    def info(self) -> dict[str, Any]:
        """The state info's ``cross_fit`` entry."""
        return {"folds": self.k, "rows": len(self.fold), "rows_per_fold": np.bincount(self.fold, minlength=self.k)
                .tolist(), "newest_width": int(self.newest.shape[1]), "seconds": self.seconds,
                "seconds_per_fold": [round(s, 2) for s in self.seconds_per_fold]}


def cross_fit_folds(rows: pd.DataFrame, k: int) -> np.ndarray:
    """The fold (0..k-1) of every row: grouped by :func:`lorax.data.groups.row_groups` with the verdict's and the
    prediction sets' fold rule, so no group straddles two folds."""
    from lorax.continual.verdict import _folds
    from lorax.data.groups import row_groups

    groups = row_groups(rows)
    n_groups = len(np.unique(groups.astype(str)))
    if n_groups < k:
        raise ValueError(f"continual.cross_fit: {k} folds need at least {k} groups of images; the task's train rows "
                         f"+ memory have {n_groups}")
    return _folds(rows["class_id"].to_numpy() % 2, groups, k)


def newest_groups(method: Method) -> dict[str, dict[str, torch.Tensor]]:
    """The newest task's producer tensors (adapter and / or trace expert), as :meth:`Method.tensor_groups` names
    them."""
    task = method.tasks[-1]
    return {name: {k: v.detach().cpu().clone() for k, v in g.items()}
            for name, g in method.tensor_groups().items() if name in (f"adapters/{task}", f"experts/{task}")}


def newest_keys(method: Method, params: Params, device: torch.device) -> list[str]:
    """The feature-store keys of the newest task's producers (adapter and / or trace expert): a hash of their
    tensors, so a fold copy's differ from the full model's."""
    from lorax.continual.frozen_parts import adapter_producer
    from lorax.continual.trace_methods import uses_traces
    from lorax.continual.trace_parts import expert_producer

    task, keys = method.tasks[-1], []
    if method.frozen_task_adapters:
        keys.append(adapter_producer(method, params, device, task)[0])
    if uses_traces(method):
        keys.append(expert_producer(method, params, device, task)[0])
    return keys


def newest_width(method: Method, total: int) -> int:
    """Width of the newest task's slice of a super-feature ``total`` wide (every task's slice is equally wide)."""
    n = len(method.tasks)
    if total % n:
        raise ValueError(f"continual.cross_fit: a super-feature of width {total} does not split into {n} tasks")
    return total // n


def cross_fit_features(rows: pd.DataFrame, params: Params, device: torch.device, store: FeatureStore,
                       train_copy: TrainCopy, scratch: Path) -> CrossFit:
    """For each of ``continual.cross_fit`` grouped folds of ``rows`` (the head's rows), ``train_copy`` trains a copy
    of the task on the other folds (its epoch checkpoints under ``scratch/fold<f>``); its newest slice of the fold's
    super-features (eval views, through ``store``) is kept. Returns the out-of-fold newest slice of every row."""
    from lorax.continual.evaluation import predict_logits

    k = int(params.continual.cross_fit)
    fold = cross_fit_folds(rows, k)
    out = CrossFit(newest=np.zeros((len(rows), 0), np.float32), fold=fold, k=k)
    newest: np.ndarray | None = None
    log.info("cross-fit: %d copies of task %s on %d grouped folds of %d rows (%s rows per fold)", k,
             rows["task"].iloc[0] if "task" in rows.columns and len(rows) else "?", k, len(rows),
             np.bincount(fold, minlength=k).tolist())
    for f in range(k):
        t0 = time.time()
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        copy = train_copy(rows.iloc[train].reset_index(drop=True), scratch / f"fold{f}")
        _, feats = predict_logits(copy, rows.iloc[test].reset_index(drop=True), params, device, features=True,
                                  desc=f"cross-fit fold {f + 1}/{k}", store=store)
        w = newest_width(copy, feats.shape[1])
        if newest is None:
            newest = np.zeros((len(rows), w), np.float32)
        newest[test] = feats[:, -w:]
        out.train_index.append(train)
        out.keys.append(newest_keys(copy, params, device))
        out.tensors.append(newest_groups(copy))
        out.seconds_per_fold.append(time.time() - t0)
        log.info("cross-fit fold %d/%d: trained on %d rows, scored %d held-out rows (%.1f s)", f + 1, k, len(train),
                 len(test), out.seconds_per_fold[-1])
        copy.to("cpu")
        del copy
    out.newest = newest if newest is not None else out.newest
    log.info("cross-fit: %d folds in %.1f s (the extra cost of continual.cross_fit for this task)", k, out.seconds)
    return out


def splice(insample: np.ndarray, newest: np.ndarray) -> np.ndarray:
    """The head's features: the in-sample super-features with their newest slice replaced by the out-of-fold one."""
    if len(insample) != len(newest) or insample.shape[1] < newest.shape[1]:
        raise ValueError(f"continual.cross_fit: out-of-fold slice {newest.shape} does not fit features "
                         f"{insample.shape}")
    out = np.array(insample, dtype=np.float32, copy=True)
    out[:, insample.shape[1] - newest.shape[1]:] = newest
    return out
