"""Open-set score: notice images that belong to no generator the model knows.

The score is the Mahalanobis distance of an image's super-feature to the nearest known class, with class means
and one shared (within-class, Ledoit-Wolf shrunk) covariance estimated on the train split, as in Lee et al. 2018
("A simple unified framework for detecting out-of-distribution samples"). Features are L2-normalised first (as
for exemplar herding) and, when the super-feature is wide, projected on their top principal directions, so the
covariance stays well conditioned with few images per class. ``unknown_score`` is the squared distance divided
by the dimension (about 1 for a typical known image); the threshold is the 95th percentile of the scores of
known validation images, so about 5% of known images are flagged by construction.

The rule a row reads (``unknown`` in :mod:`lorax.serving.schema`): an image is unknown only when its verdict is
fake (:mod:`lorax.continual.verdict`) and its score is above the threshold; its ``generator`` is then left empty, so
a row never calls an image unknown beside a generator it names. A real verdict is never unknown: a photo has no
generator to be unknown, and naming it "unknown generator" would contradict the verdict beside it. ``unknown_score``
is reported either way. (:meth:`OpenSetStats.flag` with ``require_fake`` is the same test on its own; the rows always
require the fake verdict.) See ``docs/results.md`` for how the score was measured.

Calibration is computed once per state and stored next to it, never inside it (the state directory's content
hash identifies the model in the pipeline and the registry): ``<state_dir>.openset/`` holds ``stats.safetensors``
(center, transform, class means) and ``openset.json`` (threshold, settings, and a fingerprint of the state's
files, so a calibration of another state is never used).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file
from lorax.continual.state import state_hash

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
META_FILE = "openset.json"
QUANTILE = 0.95
MAX_DIM = 256  # principal directions kept for the covariance
MAX_PER_CLASS = 200  # train images per class used for the means and covariance


class CalibrationError(ValueError):
    """The open-set calibration cannot be computed or used; the message says what is missing."""


def openset_dir(state_dir: str | Path) -> Path:
    """Where a state's calibration lives: a sibling ``<state_dir>.openset`` folder."""
    state_dir = Path(state_dir)
    return state_dir.parent / f"{state_dir.name}.openset"


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class OpenSetStats:
    """Projection into a space where the shared class covariance is the identity, and the class means there."""

    center: np.ndarray  # (D,) mean of the normalised train features
    transform: np.ndarray  # (D, k) PCA directions times the whitening of the shared covariance
    class_means: np.ndarray  # (C, k) class means in the whitened space
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict)

    def project(self, feats: np.ndarray) -> np.ndarray:
        """Whitened coordinates (squared distances there are Mahalanobis distances)."""
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[1] != self.center.shape[0]:
            raise CalibrationError(
                f"features of width {feats.shape[-1]} do not match the calibration's {self.center.shape[0]}; "
                "the calibration belongs to another model: re-run `lorax calibrate`"
            )
        return (_l2(feats) - self.center) @ self.transform

    def distances(self, feats: np.ndarray) -> np.ndarray:
        """(N, C) squared Mahalanobis distances to every class mean, divided by the dimension."""
        z = self.project(feats)
        d = (z**2).sum(1, keepdims=True) - 2 * z @ self.class_means.T + (self.class_means**2).sum(1)[None]
        return np.maximum(d, 0) / z.shape[1]

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Distance to the nearest known class: high = unlike every known class."""
        if len(feats) == 0:
            return np.zeros(0)
        return self.distances(feats).min(axis=1)

    def flag(self, score: np.ndarray, called_fake: np.ndarray) -> np.ndarray:
        """Unknown when the score is above the threshold (and, with ``require_fake``, the verdict is fake)."""
        out = np.asarray(score) > self.threshold
        if self.meta.get("require_fake", False):
            out &= np.asarray(called_fake, dtype=bool)
        return out

    # -- files ---------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write ``stats.safetensors`` + ``openset.json`` into ``out_dir`` atomically (``.partial`` + rename)."""
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({"center": self.center.astype(np.float32), "transform": self.transform.astype(np.float32),
                   "class_means": self.class_means.astype(np.float32)}, str(tmp / STATS_FILE))
        (tmp / META_FILE).write_text(json.dumps({"threshold": float(self.threshold), **self.meta}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return out_dir

    @classmethod
    def load(cls, path: str | Path) -> OpenSetStats:
        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / STATS_FILE).is_file():
            raise CalibrationError(
                f"{path}: no open-set calibration ({META_FILE}, {STATS_FILE}); run `lorax calibrate`")
        meta = json.loads((path / META_FILE).read_text())
        t = load_file(str(path / STATS_FILE))
        threshold = float(meta.pop("threshold"))
        return cls(t["center"].astype(np.float64), t["transform"].astype(np.float64),
                   t["class_means"].astype(np.float64), threshold, meta)


def fit(train_feats: np.ndarray, train_labels: np.ndarray, n_classes: int, max_dim: int = MAX_DIM) -> OpenSetStats:
    """Class means and the shared covariance of ``train_feats`` (threshold left at +inf; see :func:`set_threshold`)."""
    from sklearn.covariance import LedoitWolf

    x = _l2(train_feats)
    y = np.asarray(train_labels, dtype=np.int64)
    missing = sorted(set(range(n_classes)) - set(y.tolist()))
    if missing:
        raise CalibrationError(f"classes {missing} have no train images; every known class needs some to calibrate")
    center = x.mean(0)
    xc = x - center
    k = min(max_dim, xc.shape[1], max(1, len(xc) - n_classes))
    if k < xc.shape[1]:
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        proj = vt[:k].T
    else:
        proj = np.eye(xc.shape[1])
    yz = xc @ proj
    means = np.stack([yz[y == c].mean(0) for c in range(n_classes)])
    resid = yz - means[y]
    cov = LedoitWolf(assume_centered=True).fit(resid).covariance_
    chol = np.linalg.cholesky(cov + 1e-9 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    whiten = np.linalg.inv(chol).T  # z = yz @ whiten has identity within-class covariance
    return OpenSetStats(center, proj @ whiten, means @ whiten, float("inf"),
                        {"score": "min-class Mahalanobis (shared Ledoit-Wolf covariance) / dim", "dim": int(k),
                         "feature_dim": int(x.shape[1]), "n_train": int(len(x)), "l2_normalised": True})


def set_threshold(stats: OpenSetStats, val_feats: np.ndarray, quantile: float = QUANTILE) -> OpenSetStats:
    """Threshold = the ``quantile`` of the scores of known validation images."""
    if len(val_feats) == 0:
        raise CalibrationError("no validation images to set the open-set threshold; the manifests need val rows")
    s = stats.score(val_feats)
    stats.threshold = float(np.quantile(s, quantile))
    stats.meta.update(quantile=quantile, n_val=int(len(s)), val_score_median=float(np.median(s)))
    return stats


# ------------------------------------------------------------------------------------------------ with a model


def calibration_rows(manifests: dict[str, pd.DataFrame], tasks: list[str], split: str, max_per_class: int | None,
                     seed: int) -> pd.DataFrame:
    """The manifest rows a calibration uses (at most ``max_per_class`` per class, a seeded sample), with their class
    in ``class_id``; the same rows whichever way their features are computed (evaluation pass or Predictor)."""
    missing = [t for t in tasks if t not in manifests]
    if missing:
        raise CalibrationError(f"no manifests for tasks {missing} of the model; pass --manifests DIR holding "
                               f"{', '.join(f'{t}.parquet' for t in missing)}")
    parts = []
    for i, t in enumerate(tasks):
        df = manifests[t]
        df = df[df["split"] == split]
        for lab in (0, 1):
            d = df[df["label"].astype(int) == lab]
            if max_per_class is not None and len(d) > max_per_class:
                d = d.sample(n=max_per_class, random_state=seed)
            parts.append(d.assign(class_id=2 * i + lab))
    return pd.concat(parts, ignore_index=True)


class _CheckedFiles:
    """The rows' file bytes for the Predictor, each checked against the manifest's ``sha256`` when it is taken (one
    read per file; :class:`~lorax.data.manifest.ManifestError` stops the calibration at a changed row). An unreadable
    file is passed on as its path, so it becomes an error row as before."""

    def __init__(self, rows: pd.DataFrame, follow_links: bool) -> None:
        from lorax.data.manifest import row_names, safe_paths

        self.paths = safe_paths(rows, follow_links)
        self.sha256 = rows["sha256"].astype(str).tolist()
        self.names = row_names(rows, self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes | str:
        from lorax.data.images import BadImage, read_bytes
        from lorax.data.manifest import check_bytes

        path = self.paths[i]  # IndexError ends iteration
        try:
            data = read_bytes(path)
        except BadImage:
            return str(path)
        check_bytes(data, self.sha256[i], self.names[i])
        return data


def _features(predictor, rows: pd.DataFrame, what: str, follow_links: bool = False) -> tuple[np.ndarray, np.ndarray]:
    files = _CheckedFiles(rows, follow_links)
    pred = predictor.predict(files, names=[str(p) for p in files.paths], progress=True, keep_features=True)
    ok = (pred.table["status"] == "ok").to_numpy()
    if (~ok).any():
        bad = pred.table.loc[~ok, ["path", "error"]].head(3).to_records(index=False).tolist()
        log.warning("%s: %d of %d images unusable for calibration (e.g. %s)", what, int((~ok).sum()), len(ok), bad)
    return pred.features, ok


def calibration_from_features(train_feats: np.ndarray, train_labels: np.ndarray, val_feats: np.ndarray,
                              tasks: list[str], crops: int, max_per_class: int | None = MAX_PER_CLASS,
                              quantile: float = QUANTILE, require_fake: bool = False) -> OpenSetStats:
    """Fit on the train features of the model's tasks, threshold on their val features (the one statistics step
    of both feature sources: the pipeline's evaluation pass and :class:`~lorax.serving.predict.Predictor`)."""
    from lorax.continual.metrics import class_names

    stats = fit(train_feats, train_labels, 2 * len(tasks))
    set_threshold(stats, val_feats, quantile)
    stats.meta.update(tasks=list(tasks), classes=class_names(tasks), crops=int(crops), max_per_class=max_per_class,
                      require_fake=bool(require_fake))
    return stats


def calibrate(predictor, manifests: dict[str, pd.DataFrame], max_per_class: int | None = MAX_PER_CLASS,
              quantile: float = QUANTILE, val: dict[str, pd.DataFrame] | None = None, seed: int = 0,
              require_fake: bool = False, follow_links: bool = False) -> OpenSetStats:
    """Fit on the train split of the model's tasks and set the threshold on their val split (or on ``val``).

    Every image is checked against its manifest row (path inside its root unless ``follow_links``, sha256)."""
    tasks = list(predictor.tasks)
    rows = calibration_rows(manifests, tasks, "train", max_per_class, seed)
    feats, ok = _features(predictor, rows, "open-set train images", follow_links)
    vrows = calibration_rows(val if val is not None else manifests, tasks, "val", None, seed)
    vfeats, vok = _features(predictor, vrows, "open-set val images", follow_links)
    return calibration_from_features(feats[ok], rows["class_id"].to_numpy()[ok], vfeats[vok], tasks, predictor.crops,
                                     max_per_class, quantile, require_fake)


def store_calibration(stats: OpenSetStats, state_dir: str | Path, manifests_dir: str | Path,
                      out_dir: str | Path | None = None) -> Path:
    """Stamp the calibration with the state's fingerprint and write it (default ``<state_dir>.openset``)."""
    stats.meta.update(state_fingerprint=state_hash(state_dir), manifests=str(Path(manifests_dir).resolve()))
    out = stats.save(out_dir or openset_dir(state_dir))
    log.info("open-set calibration of %s: threshold %.3f (%.0fth percentile of %d val scores) -> %s", state_dir,
             stats.threshold, 100 * stats.meta["quantile"], stats.meta["n_val"], out)
    return out


def check_manifests(manifests_dir: Path, tasks: list[str]) -> None:
    missing = [t for t in tasks if not (Path(manifests_dir) / f"{t}.parquet").is_file()]
    if missing:
        raise CalibrationError(
            f"{manifests_dir}: no manifests for the model's tasks {missing}; the open-set calibration needs the train "
            f"and val images of every task (pass --manifests DIR, the folder `lorax data prepare` wrote)"
        )


def current_openset(state_dir: str | Path, path: str | Path | None = None) -> OpenSetStats | None:
    """The state's calibration when one exists at ``path`` (default ``<state_dir>.openset``) and belongs to this
    state; None, without a warning, when there is none yet (callers then calibrate or go without)."""
    path = Path(path) if path is not None else openset_dir(state_dir)
    return load_openset(state_dir, path) if (path / META_FILE).is_file() else None


def load_openset(state_dir: str | Path, path: str | Path | None = None) -> OpenSetStats | None:
    """The calibration of ``state_dir`` (from ``path`` or ``<state_dir>.openset``), or None when there is none
    or it belongs to another state (logged: unknown scores are then left empty)."""
    path = Path(path) if path is not None else openset_dir(state_dir)
    if not (path / META_FILE).is_file():
        log.warning("%s has no open-set calibration (%s): unknown_score is left empty; run `lorax calibrate %s "
                    "--manifests DIR` once", state_dir, path, state_dir)
        return None
    stats = OpenSetStats.load(path)
    fp = stats.meta.get("state_fingerprint")
    if fp and fp != state_hash(state_dir):
        log.warning("%s: open-set calibration %s was made for another state (retrained since?); ignoring it; "
                    "re-run `lorax calibrate %s`", state_dir, path, state_dir)
        return None
    return stats
