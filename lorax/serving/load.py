"""A resolved model (its state folder, and the open-set folder it carries) made ready to predict: a
:class:`~lorax.serving.predict.Predictor` with its open-set calibration.

What a ``--model`` argument names (a state folder, an MLflow model folder, a ``lorax train`` output folder, a
registry URI) is resolved by :mod:`pipelines.serving.download`, which knows those layouts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lorax.serving.predict import Predictor

log = logging.getLogger(__name__)


@dataclass
class ResolvedModel:
    """A model argument made local: the state directory and, when the model carries one, its open-set folder."""

    state_dir: Path
    openset_dir: Path | None
    source: str
    detector: Path | None = None  # a detector checkpoint the model carries (bundled at publish time), or None
    version: str | None = None  # the registry version it was resolved to (None: a local folder)


def model_openset(resolved: ResolvedModel, manifests: str | Path | None = None, device: str = "auto"):
    """The model's open-set calibration: the one it carries, else the state's stored one, else calibrated now (and
    stored) when the manifests of its tasks are at hand; None (logged) when none can be had."""
    from lorax.continual.state import read_info
    from lorax.serving.calibration import calibrate_state
    from lorax.serving.openset import current_openset, load_openset, openset_dir

    state = resolved.state_dir
    if resolved.openset_dir is not None:
        return load_openset(state, resolved.openset_dir)
    stats = current_openset(state)
    if stats is not None:
        return stats
    info = read_info(state)
    mdir = Path(manifests or info["params"]["data"]["manifests"])
    if all((mdir / f"{t}.parquet").is_file() for t in info["tasks"]):
        log.info("calibrating the open-set score of %s on %s (once; stored in %s)", state, mdir, openset_dir(state))
        calibrate_state(state, mdir, device=device)
        return load_openset(state)
    if manifests:
        raise FileNotFoundError(f"--manifests {mdir}: no manifests for the model's tasks {info['tasks']} there")
    log.warning("no open-set calibration for %s and no manifests at %s: unknown_score left empty (pass --manifests "
                "or run `lorax calibrate`)", state, mdir)
    return None


def predictor_for(resolved: ResolvedModel, *, device: str = "auto", crops: int | None = None,
                  batch_size: int | None = None, manifests: str | Path | None = None, openset: bool = True,
                  detector: str | Path | None = None) -> Predictor:
    """A resolved model ready to predict, with its open-set calibration (:func:`model_openset`) unless ``openset`` is
    False, and a detector's verdict beside its own: ``detector`` (a checkpoint or a folder holding one), else the one
    the model carries."""
    from lorax.serving.detector import DetectorScorer

    log.info("model %s -> state %s", resolved.source, resolved.state_dir)
    stats = model_openset(resolved, manifests, device) if openset else None
    p = Predictor.from_state(resolved.state_dir, device=device, crops=crops, batch_size=batch_size, openset=stats)
    p.model_version = resolved.version
    det = detector if detector is not None else resolved.detector
    if det is not None:
        p.detector = DetectorScorer.from_file(det, device=device, batch_size=p.batch_size)
    return p
