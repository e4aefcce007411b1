"""What a ``--model`` argument names, made local: a registered model (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/...``) resolved in the MLflow registry and its artifacts downloaded once into a
local cache; or a local state folder, MLflow model folder or ``lorax train`` output folder (:func:`resolve_local`).
Then a Predictor (:mod:`lorax.serving.load`).

The registry is the one of ``tracking.uri`` in ``params_path`` / ``MLFLOW_TRACKING_URI`` / the project's sqlite
store. A registered version is downloaded once into ``$LORAX_CACHE_DIR/models`` (default ``~/.cache/lorax``), keyed
by registry and version. Local models need no MLflow.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from lorax.serving.errors import ServingError
from lorax.serving.load import ResolvedModel, predictor_for
from lorax.serving.predict import Predictor


def tracking_config(params_path: str | Path | None):
    """The ``tracking`` section of ``params_path`` when that file exists, else the defaults."""
    import yaml

    from lorax.config import TrackingConfig

    if params_path is not None and Path(params_path).is_file():
        raw = yaml.safe_load(Path(params_path).read_text()) or {}
        return TrackingConfig(**(raw.get("tracking") or {}))
    return TrackingConfig()


def cache_root() -> Path:
    return Path(os.environ.get("LORAX_CACHE_DIR") or Path.home() / ".cache" / "lorax") / "models"


def _registry_uri(params_path: str | Path | None, model: str, flag: str = "--model") -> str:
    from pipelines.tracking.uri import TrackingUnavailable, check_reachable

    cfg = tracking_config(params_path)
    root = Path(params_path).resolve().parent if params_path is not None and Path(params_path).is_file() else Path(".")
    try:
        uri = check_reachable(cfg, root)
    except TrackingUnavailable as e:
        raise ServingError(f"{flag} {model}: the model registry is not available. {e}") from None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise ServingError(f"{flag} {model}: the registry store {db} does not exist (from {uri}); point "
                               "MLFLOW_TRACKING_URI or tracking.uri at the store the model was registered in, or "
                               "give a state folder instead")
    if uri.startswith(("http://", "https://")):  # a registry that dies mid-call fails in seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return uri


def _registered_version(client, model: str, uri: str, flag: str = "--model"):
    """The ModelVersion that ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names; None for other forms."""
    from mlflow.exceptions import MlflowException

    ref = model[len("models:/"):]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = ref.rpartition("/")
        if name and version.isdigit():
            return client.get_model_version(name, version)
        return None
    except MlflowException as e:
        try:
            known = sorted(m.name for m in client.search_registered_models(max_results=50))
        except MlflowException:
            known = []
        raise ServingError(
            f"{flag} {model}: not found in the registry {uri} ({e.message.splitlines()[0]}). Registered models: "
            f"{', '.join(known) or 'none'}; use models:/NAME@ALIAS (e.g. models:/lorax-attributor@champion) or "
            f"models:/NAME/VERSION"
        ) from None


def _download(model: str, params_path: str | Path | None, is_model: Callable[[Path], bool], what: str,
              flag: str = "--model") -> tuple[Path, str, str | None]:
    """A registry URI's artifacts, downloaded once into the cache: (local folder, label naming the version, the
    registry version or None when the URI names no registered version).
    ``is_model`` tells whether a folder holds what the URI must name (``what``, for the error)."""
    import hashlib

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = _registry_uri(params_path, model, flag)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    mv = _registered_version(client, model, uri, flag) if model.startswith("models:/") else None
    target = f"models:/{mv.name}/{mv.version}" if mv is not None else model
    key = hashlib.sha1(f"{uri}\n{target}\n{mv.source if mv is not None else ''}".encode()).hexdigest()[:16]
    dest = cache_root() / key
    if mv is None or not is_model(dest / "model"):
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=target, dst_path=str(tmp / "dl")))
        except (MlflowException, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ServingError(f"{flag} {model}: cannot download it from {uri}: {str(e).splitlines()[0]}") from None
        if not is_model(local):
            shutil.rmtree(tmp, ignore_errors=True)
            raise ServingError(f"{flag} {model}: the downloaded artifact has no {what}; not the model expected here")
        shutil.move(str(local), str(tmp / "model"))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    if mv is None:
        return dest / "model", model, None
    return dest / "model", f"{model} (version {mv.version})", str(mv.version)


def resolve_model(model: str, params_path: str | Path | None = "params.yaml") -> ResolvedModel:
    """A ``--model`` argument -> a local state directory (downloading registered models into a cache).

    Local: a state folder, an MLflow model folder, or a ``lorax train`` output folder (its last task; see
    :func:`resolve_local`).
    URIs (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``): the registry of ``tracking.uri`` in
    ``params_path`` / ``MLFLOW_TRACKING_URI`` / the project's sqlite store. A registered version is downloaded
    once into ``$LORAX_CACHE_DIR/models`` (default ``~/.cache/lorax``), keyed by registry and version.
    """
    if not is_model_uri(model):
        return resolve_local(model)
    folder, label, version = _download(model, params_path, lambda p: (p / "MLmodel").is_file(), "MLmodel file")
    return replace(from_model_folder(folder, label), version=version)


def resolve_detector(detector: str, params_path: str | Path | None = "params.yaml") -> Path:
    """A ``--detector`` argument -> a local ``detector.safetensors``: the file, a folder holding one, or a registry
    URI (``models:/lorax-detector@champion``: a version of ``detect.registered_model``, downloaded once)."""
    from lorax.serving.detector import CHECKPOINT, detector_file

    if not is_model_uri(detector):
        return detector_file(detector)
    folder, _, _ = _download(detector, params_path, lambda p: (p / CHECKPOINT).is_file(), CHECKPOINT, "--detector")
    return folder / CHECKPOINT


def load_predictor(model: str, params_path: str | Path | None = "params.yaml", *, device: str = "auto",
                   crops: int | None = None, batch_size: int | None = None, manifests: str | Path | None = None,
                   openset: bool = True, detector: str | None = None) -> Predictor:
    """A ``--model`` argument (state folder, model folder or ``models:/...`` URI) ready to predict, with its
    open-set calibration (:func:`lorax.serving.load.model_openset`) unless ``openset`` is False, and the verdict of
    ``detector`` (a ``--detector`` argument, :func:`resolve_detector`; default: the one the model carries) beside
    its own."""
    det = resolve_detector(detector, params_path) if detector else None
    return predictor_for(resolve_model(model, params_path), device=device, crops=crops, batch_size=batch_size,
                         manifests=manifests, openset=openset, detector=det)


# ------------------------------------------------------------------------------------------------ local models
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
    detector = folder / arts["detector"]["path"] if "detector" in arts else None  # bundled at publish time
    return ResolvedModel(state, openset, source or str(folder), detector)


def _local_model(path: Path) -> ResolvedModel:
    from lorax.continual.state import is_state

    if is_state(path):
        return ResolvedModel(path, None, str(path))
    if (path / "MLmodel").is_file():
        return from_model_folder(path)
    states = sorted(p.name for p in (path / "state").glob("*") if is_state(p)) if (path / "state").is_dir() else []
    if states and (path / "metrics.json").is_file():  # a `lorax train` output folder: its last task
        from lorax.continual.summary import read_metrics

        tasks = read_metrics(path / "metrics.json").get("tasks") or []
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
