"""Exemplar memory (iCaRL rehearsal) stored as manifest rows, never pixels.

The memory is a table of the selected images' manifest rows (``lorax.data.manifest`` columns: path, sha256,
class_id, ...) plus a ``rank`` column, the selection order within the class and kind, and a boolean ``calib``
column, the kind:

* ``calib = False``: chosen by ``continual.selection`` (herding by default). Herding yields its picks in order of
  importance, so shrinking keeps ranks ``0..k-1`` of this kind (the iCaRL reduction).
* ``calib = True``: calibration exemplars, a share ``continual.calibration_share`` of the class's slots drawn at
  random (seeded, :func:`calibration_draw`) from the class's train rows when the class is learned; the other slots
  are selected among the rest. Herding keeps the most typical images, whose scores are more confident than a test
  image's; these rows are exchangeable with the class's test images, so the prediction sets of an OLD class are
  calibrated on them alone (:func:`lorax.continual.head.fit_sets`). Their ``rank`` is the draw order: the first
  ``k`` of a random permutation are a random ``k``-subset, so a prefix stays random.

Shrinking a class from ``n`` rows (``c`` of them calibration rows) to ``k``: it keeps ``round(k * c / n)``
calibration rows (the first by rank) and fills the rest with the first of the other kind (:func:`split_budget`),
so each kind keeps its proportional share and the kept random rows are a subset of the earlier ones. Every row,
of both kinds, is replayed in training and fits the head. A table saved before the column existed loads with
``calib = False`` everywhere: today's memory, calibrated as before.

Selection is done once, globally, on all of a class's features (gathered from every process before the
call), without augmentation, and is deterministic: within a class, rows are put in a canonical order
(by ``path``, then input position) before selecting, so the result does not depend on row order, and
ties are broken by the lowest index in that order.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from lorax.utils.io import atomic_path

__all__ = [
    "ExemplarMemory",
    "closest_to_mean",
    "herding",
    "l2_normalize",
    "per_class_budget",
    "calibration_draw",
    "random_select",
    "select",
    "split_budget",
]

Method = Literal["herding", "random", "closest"]
METHODS = ("herding", "random", "closest")


def l2_normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64; an all-zero row stays zero)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be a 2-D array (n_samples, dim), got shape {f.shape}")
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), eps)


def _check_m(m: int) -> int:
    if int(m) != m or m < 0:
        raise ValueError(f"number of exemplars must be an integer >= 0, got {m}")
    return int(m)


def herding(features: np.ndarray, m: int) -> np.ndarray:
    """iCaRL herding: indices of ``min(m, n)`` samples in selection order.

    With ``phi`` the L2-normalised features and ``mu`` their mean, step ``k`` (1-based) picks the unused
    sample ``i`` minimising ``|| mu - (phi_i + sum_{s in S} phi_s) / k ||``; no repeats; ties go to the lowest
    index. The selected set's mean thus tracks the class mean as closely as possible for every prefix.
    """
    phi = l2_normalize(features)
    m = min(_check_m(m), len(phi))
    mu = phi.mean(axis=0)
    chosen: list[int] = []
    running = np.zeros_like(mu)
    free = np.ones(len(phi), dtype=bool)
    for k in range(1, m + 1):
        dist = np.linalg.norm(mu - (running + phi) / k, axis=1)
        dist[~free] = np.inf
        i = int(np.argmin(dist))  # first minimum = lowest index
        chosen.append(i)
        free[i] = False
        running += phi[i]
    return np.asarray(chosen, dtype=np.int64)


def closest_to_mean(features: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``min(m, n)`` samples nearest the mean of the L2-normalised features, nearest first."""
    phi = l2_normalize(features)
    m = min(_check_m(m), len(phi))
    dist = np.linalg.norm(phi - phi.mean(axis=0), axis=1)
    return np.argsort(dist, kind="stable")[:m].astype(np.int64)


def random_select(n: int, m: int, seed: int) -> np.ndarray:
    """``min(m, n)`` distinct indices of ``range(n)`` drawn with ``numpy.random.default_rng(seed)``."""
    m = min(_check_m(m), n)
    return np.random.default_rng(seed).permutation(n)[:m].astype(np.int64)


def select(features: np.ndarray, m: int, method: Method, seed: int = 0) -> np.ndarray:
    """Dispatch to ``herding`` / ``random_select`` / ``closest_to_mean`` (``continual.selection``)."""
    if method == "herding":
        return herding(features, m)
    if method == "closest":
        return closest_to_mean(features, m)
    if method == "random":
        return random_select(len(features), m, seed)
    raise ValueError(f"continual.selection: unknown method {method!r}; allowed: {', '.join(METHODS)}")


def split_budget(k: int, n_calib: int, n_other: int) -> tuple[int, int]:
    """(calibration rows, other rows) a class keeps out of ``k`` slots when it holds ``n_calib`` and ``n_other``:
    the calibration rows keep their proportional share, ``round(k * n_calib / (n_calib + n_other))`` (halves round
    to even, as Python's ``round``), each kind capped by what it holds (a short kind's slots go to the other)."""
    k = _check_m(k)
    n = n_calib + n_other
    if k >= n:
        return n_calib, n_other
    keep_c = min(n_calib, round(k * n_calib / n)) if n else 0
    keep_o = min(n_other, k - keep_c)
    return min(n_calib, k - keep_o), keep_o


def calibration_draw(n: int, m: int, share: float, seed: int) -> np.ndarray:
    """Indices (draw order) of the calibration exemplars of a class of ``n`` train rows given ``m`` slots:
    ``round(share * min(m, n))`` distinct rows, drawn with ``default_rng`` on a seed of their own."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"continual.calibration_share must be in [0, 1), got {share}")
    k = round(share * min(_check_m(m), n))
    return random_select(n, k, zlib.crc32(f"calib:{seed}".encode())) if k else np.zeros(0, dtype=np.int64)


def per_class_budget(memory_size: int, n_classes: int, mode: str = "fixed_total", per_class: int = 0) -> int:
    """Exemplars kept per class once ``n_classes`` classes have been seen.

    ``fixed_total``: the total budget ``memory_size`` split evenly, ``memory_size // n_classes`` (old classes
    shrink as classes arrive); ``fixed_per_class``: ``per_class`` for every class. 0 means no memory.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if mode == "fixed_total":
        return _check_m(memory_size) // n_classes
    if mode == "fixed_per_class":
        return _check_m(per_class)
    raise ValueError(f"continual.memory_mode: unknown mode {mode!r}; allowed: fixed_total, fixed_per_class")


def _class_seed(seed: int, class_id: int) -> int:
    """A per-class seed, so classes draw independently but reproducibly."""
    return zlib.crc32(f"{seed}:{class_id}".encode())


class ExemplarMemory:
    """Selected manifest rows with a ``rank`` column; see the module docstring."""

    def __init__(self, rows: pd.DataFrame | None = None) -> None:
        if rows is None:
            rows = pd.DataFrame({"class_id": pd.Series(dtype="int64"), "rank": pd.Series(dtype="int64"),
                                 "calib": pd.Series(dtype="bool")})
        missing = [c for c in ("class_id", "rank") if c not in rows.columns]
        if missing:
            raise ValueError(f"exemplar memory rows lack columns {missing}")
        if "calib" not in rows.columns:  # a table saved before calibration exemplars: all selected rows
            rows = rows.assign(calib=False)
        rows = rows.assign(calib=rows["calib"].fillna(False).astype(bool))
        self._rows = rows.sort_values(["class_id", "calib", "rank"], kind="stable").reset_index(drop=True)

    def __len__(self) -> int:
        return len(self._rows)

    def classes(self) -> list[int]:
        return sorted(int(c) for c in self._rows["class_id"].unique())

    def class_counts(self) -> dict[int, int]:
        """``{class_id: number of exemplars}``, sorted by class."""
        return {int(c): int(n) for c, n in self._rows.groupby("class_id").size().sort_index().items()}

    def calib_counts(self) -> dict[int, int]:
        """``{class_id: number of calibration exemplars}``, sorted by class (0 for a class without any)."""
        return {int(c): int(n) for c, n in self._rows.groupby("class_id")["calib"].sum().sort_index().items()}

    def rows(self) -> pd.DataFrame:
        """A copy of the memory table (manifest columns + ``rank`` + ``calib``), sorted by class, kind (selected
        first), then rank."""
        return self._rows.copy()

    def manifest(self) -> pd.DataFrame:
        """The rows without ``rank`` (``calib`` kept: the prediction sets read it): ready to concatenate to the
        next task's training manifest."""
        return self._rows.drop(columns=["rank"]).copy()

    def add_classes(
        self, rows: pd.DataFrame, features: np.ndarray, method: Method = "herding", budget: int = 0, seed: int = 0,
        calibration_share: float = 0.0,
    ) -> None:
        """Select up to ``budget`` exemplars for each class in ``rows`` (grouped by ``class_id``).

        ``features[k]`` belongs to ``rows.iloc[k]`` (herding uses the L2-normalised super-features). A class
        with fewer samples than its budget keeps all of them. ``calibration_share`` of a class's slots are first
        drawn at random (``calib = True``, :func:`calibration_draw`), the rest selected by ``method`` among the
        other rows. Classes already in memory are an error: call ``shrink`` for old classes instead.
        """
        features = np.asarray(features)
        if "class_id" not in rows.columns or "path" not in rows.columns:
            raise ValueError("add_classes: rows must be manifest rows with 'class_id' and 'path' columns")
        if features.ndim != 2 or len(features) != len(rows):
            raise ValueError(f"add_classes: features {features.shape} must be (len(rows)={len(rows)}, dim)")
        if method not in METHODS:
            raise ValueError(f"continual.selection: unknown method {method!r}; allowed: {', '.join(METHODS)}")
        budget = _check_m(budget)
        again = sorted(set(int(c) for c in rows["class_id"].unique()) & set(self.classes()))
        if again:
            raise ValueError(f"add_classes: classes {again} are already in memory; use shrink() for old classes")
        rows = rows.reset_index(drop=True)
        picked = []
        for cid, group in rows.groupby("class_id", sort=True):
            # canonical order: by path, then input position -> independent of how rows were gathered
            idx = group.assign(_pos=group.index).sort_values(["path", "_pos"], kind="stable").index.to_numpy()
            cal = calibration_draw(len(idx), budget, calibration_share, _class_seed(seed, int(cid)))
            rest = np.setdiff1d(np.arange(len(idx)), cal)  # ascending: the canonical order is kept
            sel = select(features[idx[rest]], budget - len(cal), method, _class_seed(seed, int(cid)))
            for kind, take in ((True, idx[cal]), (False, idx[rest[sel]])):
                chosen = rows.loc[take].copy()
                chosen["rank"] = np.arange(len(take), dtype=np.int64)
                chosen["calib"] = kind
                picked.append(chosen)
        if picked:
            new = pd.concat(picked, ignore_index=True)
            self._rows = new if len(self._rows) == 0 else pd.concat([self._rows, new], ignore_index=True)
            self._rows = self._rows.sort_values(["class_id", "calib", "rank"], kind="stable").reset_index(drop=True)

    def shrink(self, budget: int) -> None:
        """Keep ``budget`` exemplars of every class: of each kind its proportional share (:func:`split_budget`), the
        first by rank (with herding, the iCaRL reduction; for the calibration rows, a prefix of their random draw)."""
        budget = _check_m(budget)
        r = self._rows
        keep = np.zeros(len(r), dtype=bool)
        for _, g in r.groupby("class_id", sort=False):
            is_cal = g["calib"].to_numpy(bool)
            k_cal, k_other = split_budget(budget, int(is_cal.sum()), int((~is_cal).sum()))
            ranks = g["rank"].to_numpy()
            # rank order within each kind (ranks are 0..n-1 per kind in a table this class wrote; any table: sorted)
            order_cal = np.argsort(np.where(is_cal, ranks, np.iinfo(np.int64).max), kind="stable")[:k_cal]
            order_other = np.argsort(np.where(~is_cal, ranks, np.iinfo(np.int64).max), kind="stable")[:k_other]
            pos = g.index.to_numpy()
            keep[pos[order_cal]] = True
            keep[pos[order_other]] = True
        self._rows = r[keep].reset_index(drop=True)

    def replay(self, size: int | None) -> ExemplarMemory:
        """The exemplars a task's training replays (``continual.replay_size``): a copy shrunk to ``size //
        classes`` per class (:meth:`shrink`: the first by rank, each kind in proportion), or this memory itself when
        ``size`` is None or the memory holds no more. With herding the kept rows are the ones a memory of that size
        would have selected (a prefix of the greedy order)."""
        if size is None or len(self) <= size:
            return self
        copy = ExemplarMemory(self._rows.copy())
        copy.shrink(max(1, size // len(self.classes())))
        return copy

    def save(self, path: str | Path, data_root: str | Path | None = None) -> Path:
        """Write the table as parquet (atomic replace); rows under ``data_root`` are stored relative to it, as in
        the manifests they come from (:func:`lorax.data.manifest.unrooted`)."""
        path = Path(path)
        rows = self._rows
        if data_root is not None:
            from lorax.data.manifest import unrooted

            rows = unrooted(rows, data_root)
        with atomic_path(path) as tmp:
            rows.to_parquet(tmp, index=False)
        return path

    @classmethod
    def load(cls, path: str | Path, data_root: str | Path | None = None) -> ExemplarMemory:
        """The saved table; with ``data_root``, its rows' roots are that folder (:func:`lorax.data.manifest.rooted`)."""
        from lorax.data.manifest import rooted

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: exemplar memory not found (written by ExemplarMemory.save)")
        rows = pd.read_parquet(path)
        missing = [c for c in ("class_id", "rank") if c not in rows.columns]
        if missing:
            raise ValueError(f"{path}: not an exemplar memory table, columns {missing} are missing")
        return cls(rooted(rows, data_root, path) if data_root is not None else rows)
