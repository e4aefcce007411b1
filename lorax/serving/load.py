"""A local ``--model`` made ready to predict: a state folder, an MLflow model folder or a ``lorax train`` output
folder -> a :class:`~lorax.serving.predict.Predictor` with its open-set calibration.

Registry URIs (``models:/...``) are downloaded into a local MLflow model folder by
:mod:`pipelines.serving.download`, which then uses :func:`from_model_folder` and :func:`predictor_for` from here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lorax.serving.errors import ServingError
from lorax.serving.predict import Predictor

log = logging.getLogger(__name__)


@dataclass
class ResolvedModel:
    """A model argument made local: the state directory and, when the model carries one, its open-set folder."""

    state_dir: Path
    openset_dir: Path | None
    source: str


def is_model_uri(model: str) -> bool:
    """``models:/``, ``runs:/`` and other scheme URIs go to MLflow; anything else is a local path."""
    import re

    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", model)) and not Path(model).exists()


def from_model_folder(folder: str | Path, source: str = "") -> ResolvedModel:
    """An MLflow pyfunc model folder (``MLmodel`` + artifacts) -> its state and open-set artifacts."""
    import yaml

    folder = Path(folder)
    spec = yaml.safe_load((folder / "MLmodel").read_text())
    arts = (spec.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {}) or {}
    if "state" not in arts:
        raise ServingError(f"{source or folder}: an MLflow model without a lorax state artifact; it was not "
                           "saved by lorax (pipelines.serving.pyfunc.save_attributor)")
    state = folder / arts["state"]["path"]
    openset = folder / arts["openset"]["path"] if "openset" in arts else None
    return ResolvedModel(state, openset, source or str(folder))


def _local_model(path: Path) -> ResolvedModel:
    from lorax.continual.state import is_state

    if is_state(path):
        return ResolvedModel(path, None, str(path))
    if (path / "MLmodel").is_file():
        return from_model_folder(path)
    states = sorted(p.name for p in (path / "state").glob("*") if is_state(p)) if (path / "state").is_dir() else []
    if states and (path / "metrics.json").is_file():  # a `lorax train` output folder: its last task
        tasks = json.loads((path / "metrics.json").read_text()).get("tasks") or []
        if tasks and is_state(path / "state" / tasks[-1]):
            return ResolvedModel(path / "state" / tasks[-1], None, str(path))
    hint = f"; states found: {', '.join(str(path / 'state' / s) for s in states)}" if states else ""
    raise ServingError(f"--model {path}: not a lorax state (no state.json) nor an MLflow model (no MLmodel){hint}. "
                       "Give a state folder (OUT/state/<task>) or a model URI (models:/lorax-attributor@champion)")


def resolve_local(model: str) -> ResolvedModel:
    """A ``--model`` argument that is not a model URI: a state folder, an MLflow model folder, or a ``lorax train``
    output folder (its last task)."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ServingError(f"--model {model}: no such folder, and not a model URI; give a state folder "
                           "(OUT/state/<task>) or models:/lorax-attributor@champion")
    return _local_model(path)


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
                  batch_size: int | None = None, manifests: str | Path | None = None, openset: bool = True) -> Predictor:
    """A resolved model ready to predict, with its open-set calibration (:func:`model_openset`) unless ``openset`` is
    False."""
    log.info("model %s -> state %s", resolved.source, resolved.state_dir)
    stats = model_openset(resolved, manifests, device) if openset else None
    return Predictor.from_state(resolved.state_dir, device=device, crops=crops, batch_size=batch_size, openset=stats)
