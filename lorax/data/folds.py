"""Grouped folds of the train split, for choosing settings without the validation split (``lorax tune``).

The train rows of the tuned tasks are cut into ``k`` folds by group (:func:`lorax.data.groups.row_groups`: crops of
one photo, or the images several generators drew from one prompt, are never on both sides), stratified by class,
with one assignment across all tasks (a prompt group shared by two tasks is held out in both or in neither). Each
fold's manifests are the tasks' train rows with the held-out ones labelled ``val``; the real validation rows are
dropped before anything else happens, so no image of them is opened, decoded or hashed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from lorax.data.groups import row_groups
from lorax.data.manifest import FAKE, REAL


class FoldError(ValueError):
    """The train split cannot be cut into the asked folds; the message says how to fix it."""


def assign_folds(rows: pd.DataFrame, k: int, seed: int = 0) -> np.ndarray:
    """The fold (0..k-1) of every row: whole groups per fold, classes spread evenly (scikit-learn's
    StratifiedGroupKFold, shuffled by ``seed``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = row_groups(rows)
    n_groups = len(set(groups))
    if n_groups < k:
        raise FoldError(f"tune.folds: {k} folds need at least {k} groups of train images, found {n_groups}; use "
                        f"fewer folds")
    folds = np.full(len(rows), -1, dtype=int)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    import warnings

    with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits": checked below
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, held) in enumerate(cv.split(np.zeros(len(rows)), rows["class_id"].to_numpy(), groups)):
            folds[held] = f
    return folds


def train_folds(manifests: dict[str, pd.DataFrame], k: int, seed: int = 0) -> list[dict[str, pd.DataFrame]]:
    """``k`` sets of manifests (task -> rows, tasks in order): each task's train rows, the fold's held-out ones
    labelled ``val``; the validation split is dropped. Every class of every task is on both sides of every fold
    (:class:`FoldError` otherwise, naming it)."""
    train = {t: m[m["split"] == "train"].reset_index(drop=True) for t, m in manifests.items()}
    empty = [t for t, m in train.items() if not len(m)]
    if empty:
        raise FoldError(f"tasks {empty} have no train rows to cut into folds")
    both = pd.concat([m.assign(_task=t) for t, m in train.items()], ignore_index=True)
    fold = assign_folds(both, k, seed)
    out: list[dict[str, pd.DataFrame]] = [{} for _ in range(k)]
    for t, m in train.items():
        f_task = fold[(both["_task"] == t).to_numpy()]
        for f in range(k):
            held = f_task == f
            for label, name in ((REAL, "real"), (FAKE, "fake")):
                is_label = (m["label"] == label).to_numpy()
                if not (is_label & held).any() or not (is_label & ~held).any():
                    raise FoldError(f"task {t}: fold {f + 1} of {k} leaves its {name} train images all on one side "
                                    f"({int(is_label.sum())} of them in {len(set(row_groups(m[is_label])))} groups); "
                                    f"use fewer tune.folds")
            out[f][t] = m.assign(split=np.where(held, "val", "train"))
    return out


def folds_digest(folds: list[dict[str, pd.DataFrame]]) -> str:
    """A short hash of which image is on which side of which fold (names the folds' folder: a changed split never
    reuses the runs of another)."""
    h = hashlib.sha256()
    for f, tasks in enumerate(folds):
        for t, m in tasks.items():
            for sha, split in zip(m["sha256"].astype(str), m["split"].astype(str), strict=True):
                h.update(f"{f}|{t}|{sha}|{split}\n".encode())
    return h.hexdigest()[:10]
