"""Attribute images with a trained state: ``lorax predict``, the served pyfunc and ``lorax scan`` share this code.

Every image goes through the same safe loader and RGB rules as training (:mod:`lorax.data.images`) and the same
crop policy: never resized; an image larger than the crop is scored on ``eval.crops`` deterministic crops
(:func:`lorax.data.dataset.crop_boxes`; 1 = the centre crop, as in evaluation) whose logits and super-features
are averaged; an image smaller than the crop is an error row. A file that cannot be used becomes a row with
``status = "error"`` and the reason; it never stops the run.

Output columns (one row per input, in input order) are :data:`COLUMNS`:

* ``verdict``: ``real`` or ``fake`` (the kind of the most probable class);
* ``generator``: the task (generator) of the most probable class when the verdict is fake, else empty;
* ``predicted_class`` / ``probability``: that class (``<task>/real|fake``) and its softmax probability;
* ``fake_probability``: summed probability of all fake classes;
* ``top{1,2,3}_class`` / ``top{1,2,3}_prob``;
* ``unknown_score`` / ``unknown_flag``: the open-set score (:mod:`lorax.serving.openset`) and whether it flags
  the image as a fake from no known generator; NaN / empty when the state has no open-set calibration.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from lorax.continual import metrics as M
from lorax.continual.metrics import class_names
from lorax.data.dataset import crop_boxes, to_tensor
from lorax.data.images import BadImage, DataError, crop_image, open_image, special_kind, to_rgb_array
from lorax.utils.io import atomic_path

log = logging.getLogger(__name__)

TOP_K = 3
COLUMNS = [
    "path", "status", "error", "width", "height", "verdict", "generator", "predicted_class", "probability",
    "fake_probability", *[f"top{i}_{k}" for i in range(1, TOP_K + 1) for k in ("class", "prob")],
    "unknown_score", "unknown_flag",
]
DTYPES = {
    "path": "string", "status": "string", "error": "string", "width": "Int64", "height": "Int64",
    "verdict": "string", "generator": "string", "predicted_class": "string", "probability": "Float64",
    "fake_probability": "Float64", **{f"top{i}_class": "string" for i in range(1, TOP_K + 1)},
    **{f"top{i}_prob": "Float64" for i in range(1, TOP_K + 1)}, "unknown_score": "Float64", "unknown_flag": "boolean",
}
OUTPUT_SUFFIXES = (".csv", ".json", ".parquet")
LIST_SUFFIXES = (".txt", ".lst")


class ServingError(ValueError):
    """Nothing could be done (no inputs, no model, no registry); the message says what to fix."""


def image_suffixes() -> set[str]:
    """File endings Pillow can open (what a folder walk picks up)."""
    return {s.lower() for s in Image.registered_extensions()}


# ------------------------------------------------------------------------------------------------ inputs


def _read_list(path: Path) -> list[str]:
    """Paths in a list file, one a line (blank lines and ``#`` comments skipped); relative to the list's folder."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(str(p if p.is_absolute() else path.parent / p))
    return out


@dataclass(frozen=True)
class Refused:
    """An input found but not opened; it becomes an error row with ``reason`` in its place in the output."""

    path: str
    reason: str

    def __str__(self) -> str:
        return self.path


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _walk(folder: Path, suffixes: set[str], follow_links: bool) -> tuple[list[str | Refused], int]:
    """Candidates under ``folder`` (sorted by path) and how many other files were passed over.

    Rules (``lorax predict --help`` says the same): hidden files and folders are skipped silently; a file without an
    image ending is passed over (counted); an entry with an image ending that is not a regular file (a folder, FIFO,
    socket, device) gets a row saying so, and so does any FIFO/socket/device; a symlink whose target leaves
    ``folder`` gets a row unless ``follow_links``; symlinked folders are walked only with ``follow_links`` (each real
    folder once). Nothing is opened here: only ``stat``.
    """
    root = os.path.realpath(folder)
    found: list[str | Refused] = []
    other = 0
    seen = {root}
    todo = [folder]
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            found.append(Refused(str(d), f"folder not readable: {e.strerror or e}"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            path = Path(e.path)
            image_ending = path.suffix.lower() in suffixes
            link = e.is_symlink()
            if link:
                target = os.path.realpath(path)
                if not os.path.exists(target):  # dangling: kept, so the row says "file not found (dangling symlink)"
                    if image_ending:
                        found.append(str(path))
                    else:
                        other += 1
                    continue
                if not follow_links and not _inside(target, root):
                    if image_ending or os.path.isdir(target):
                        found.append(Refused(str(path), f"symlink leaving {folder} (to {target}); pass --follow-links "
                                                        f"to use it"))
                    continue
            try:
                mode = os.stat(path).st_mode
            except OSError as err:
                found.append(Refused(str(path), f"unreadable: {err.strerror or err}"))
                continue
            if stat.S_ISDIR(mode):
                real = os.path.realpath(path)
                # a link to a folder inside this one is not walked without follow_links: its files are reached at
                # their real place; any folder is walked once
                if (not link or follow_links) and real not in seen:
                    seen.add(real)
                    todo.append(path)
                if image_ending:
                    found.append(Refused(str(path), "a directory with an image ending (its images are listed "
                                                    "separately)"))
            elif special_kind(mode):
                found.append(Refused(str(path), f"not a regular file ({special_kind(mode)}); refused without opening "
                                                "it"))
            elif image_ending:
                found.append(str(path))
            else:
                other += 1
    return sorted(found, key=str), other


def collect_inputs(paths: Iterable[str | Path], follow_links: bool = False) -> list[str | Refused]:
    """Expand command-line paths into image paths, in a stable order.

    A folder is walked recursively for files Pillow can open (by ending; the rules for hidden files, non-regular
    files and symlinks are in :func:`_walk`: every entry that looks like an input but is not used is a
    :class:`Refused` row). A ``.txt``/``.lst`` file lists paths, any other path is used as given (a non-image
    becomes an error row; a symlink named on the command line or in a list is the user's choice and is followed).
    A path that does not exist is kept, so it appears in the output as "file not found". Raises
    :class:`ServingError` when nothing is left (every folder empty), naming what was searched.
    """
    suffixes = image_suffixes()
    out: list[str | Refused] = []
    empty: list[str] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found, other = _walk(p, suffixes, follow_links)
            if not found:
                empty.append(f"{p} ({'empty' if not other else f'{other} files, none with an image ending'})")
            out += found
        elif p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            listed = _read_list(p)
            if not listed:
                empty.append(f"{p} (list file with no paths)")
            out += listed
        else:
            out.append(str(p))
    if empty:
        log.warning("no images in: %s", "; ".join(empty))
    if not out:
        raise ServingError(
            f"no images to predict: {'; '.join(empty) or 'no paths given'}. Pass image files, folders holding images "
            f"(searched recursively for .png, .jpg, .webp, .tif, ... files) "
            f"or a .txt file listing image paths"
        )
    return out


# ------------------------------------------------------------------------------------------------ model


@dataclass
class Prediction:
    """The table (:data:`COLUMNS`) and, row-aligned, the averaged logits and features (NaN on error rows;
    ``features`` is (N, 0) unless asked for: a large run would not hold them in memory)."""

    table: pd.DataFrame
    logits: np.ndarray
    features: np.ndarray


class Predictor:
    """A loaded state plus the crop policy; ``predict(sources)`` gives one row per image.

    ``openset`` is an :class:`lorax.serving.openset.OpenSetStats` (or None: unknown scores are NaN).
    """

    def __init__(self, method: Any, info: dict[str, Any], device: str | torch.device = "cpu",
                 crops: int | None = None, batch_size: int | None = None, openset: Any = None) -> None:
        from lorax.continual.batches import image_norm

        self.method = method.eval()
        self.info = info
        self.device = torch.device(device)
        params = info["params"]
        self.tasks = list(info["tasks"])
        self.classes = class_names(self.tasks)
        self.crop = int(params["model"]["img_size"])
        self.max_pixels = int(params["data"]["max_image_pixels"])
        self.crops = int(crops if crops is not None else params.get("eval", {}).get("crops", 1))
        if self.crops < 1:
            raise ServingError(f"--crops: must be >= 1, got {self.crops}")
        self.batch_size = int(batch_size or params.get("eval", {}).get("batch_size", 64))
        if self.batch_size < 1:
            raise ServingError(f"--batch-size: must be >= 1, got {self.batch_size}")
        self.amp = bool(params.get("train", {}).get("amp", False)) and self.device.type == "cuda"
        self.mean, self.std = image_norm(method)
        self.openset = openset

    @classmethod
    def from_state(cls, state_dir: str | Path, device: str = "auto", crops: int | None = None,
                   batch_size: int | None = None, openset: Any = "auto") -> Predictor:
        """Load ``state_dir``; ``openset="auto"`` uses the state's saved calibration when there is one."""
        from lorax.continual.state import load_state
        from lorax.continual.batches import resolve_device

        dev = resolve_device(device)
        method, info = load_state(state_dir, device=dev)
        if isinstance(openset, str) and openset == "auto":
            from lorax.serving.openset import load_openset

            openset = load_openset(state_dir)
        return cls(method, info, dev, crops, batch_size, openset)

    # -- images --------------------------------------------------------------------------------------------
    def load(self, source: str | Path | bytes | Refused, name: str) -> tuple[torch.Tensor, int, int]:
        """(crops x C x H x W tensor, width, height) of one image; :class:`BadImage` says why not.

        A :class:`Refused` input is never opened; a path must be a regular file (checked from ``stat``, so a FIFO
        or device cannot block or stream forever).
        """
        if isinstance(source, Refused):
            raise BadImage(name, source.reason)
        if not isinstance(source, bytes) and not Path(source).exists():
            raise BadImage(name, "file not found" + (" (dangling symlink)" if Path(source).is_symlink() else ""))
        img = open_image(source, self.max_pixels, name=name)
        w, h = img.size
        if w < self.crop or h < self.crop:
            raise BadImage(name, f"image {w}x{h} is smaller than the model's crop {self.crop}; crop, never resize")
        boxes = crop_boxes(w, h, self.crop, self.crops)
        crops = [to_tensor(to_rgb_array(crop_image(img, box, name), name), self.mean, self.std) for box in boxes]
        return torch.stack(crops), w, h

    # -- inference -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run_batch(self, xs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        from lorax.continual.methods import logits_and_features  # a model is loaded: its modules are imported

        x = torch.cat(xs).to(self.device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else torch.autocast("cpu", enabled=False)
        with ctx:
            logits, feats = logits_and_features(self.method, x)
        logits, feats = logits.float().cpu(), feats.float().cpu()
        n = [len(t) for t in xs]  # crops per image: average logits and features over them
        logits = torch.stack([c.mean(0) for c in torch.split(logits, n)])
        feats = torch.stack([c.mean(0) for c in torch.split(feats, n)])
        return logits.numpy(), feats.numpy()

    def predict(self, sources: Sequence[str | Path | bytes | Refused], names: Sequence[str] | None = None,
                progress: bool = True, keep_features: bool = False) -> Prediction:
        """Score ``sources`` (paths, image bytes or :class:`Refused` entries of :func:`collect_inputs`, which become
        error rows; ``names`` label them in the ``path`` column).

        The open-set score is computed batch by batch; ``keep_features`` also returns the super-features.
        """
        names = [str(s) if not isinstance(s, bytes) else f"<bytes {i}>" for i, s in enumerate(sources)] \
            if names is None else [str(n) for n in names]
        if len(names) != len(sources):
            raise ValueError(f"{len(names)} names for {len(sources)} images")
        n = len(sources)
        n_cls = len(self.classes)
        logits = np.full((n, n_cls), np.nan, dtype=np.float32)
        feats: np.ndarray | None = None
        scores = np.full(n, np.nan)
        errors: list[str | None] = [None] * n
        sizes = np.full((n, 2), -1, dtype=np.int64)
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            nonlocal feats
            if not pending:
                return
            lg, ft = self._run_batch([t for _, t in pending])
            rows = [i for i, _ in pending]
            logits[rows] = lg
            if self.openset is not None:
                scores[rows] = self.openset.score(ft)
            if keep_features:
                if feats is None:
                    feats = np.full((n, ft.shape[1]), np.nan, dtype=np.float32)
                feats[rows] = ft
            pending.clear()

        bar = tqdm(total=n, desc="predict", unit="img", disable=None if progress else True)
        for i, (src, name) in enumerate(zip(sources, names, strict=True)):
            try:
                x, w, h = self.load(src, name)
                sizes[i] = (w, h)
                pending.append((i, x))
            except BadImage as e:
                errors[i] = e.reason
            except (DataError, OSError, ValueError) as e:  # anything else a broken file can raise
                errors[i] = str(e)
            if sum(len(t) for _, t in pending) >= self.batch_size:
                flush()
            bar.update(1)
        flush()
        bar.close()
        if feats is None:
            feats = np.full((n, 0), np.nan, dtype=np.float32)
        return Prediction(self._table(names, logits, scores, errors, sizes), logits, feats)

    def _table(self, names: list[str], logits: np.ndarray, scores: np.ndarray, errors: list[str | None],
               sizes: np.ndarray) -> pd.DataFrame:
        n = len(names)
        ok = np.array([e is None for e in errors], dtype=bool)
        cols: dict[str, list[Any]] = {c: [None] * n for c in COLUMNS}
        cols["path"] = list(names)
        cols["status"] = ["ok" if o else "error" for o in ok]
        cols["error"] = list(errors)
        cols["width"] = [int(w) if w >= 0 else None for w in sizes[:, 0]]
        cols["height"] = [int(h) if h >= 0 else None for h in sizes[:, 1]]
        rows = np.flatnonzero(ok)
        if len(rows):
            probs = M.softmax(logits[rows])
            pred = probs.argmax(axis=1)
            fake_p = M.fake_probability(probs)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
            score = flag = None
            if self.openset is not None:
                score = scores[rows]
                flag = self.openset.flag(score, fake_p)
            for j, i in enumerate(rows):
                c = int(pred[j])
                cols["verdict"][i] = "fake" if c % 2 else "real"
                cols["generator"][i] = self.tasks[c // 2] if c % 2 else None
                cols["predicted_class"][i] = self.classes[c]
                cols["probability"][i] = float(probs[j, c])
                cols["fake_probability"][i] = float(fake_p[j])
                for r, k in enumerate(order[j]):
                    cols[f"top{r + 1}_class"][i] = self.classes[int(k)]
                    cols[f"top{r + 1}_prob"][i] = float(probs[j, k])
                if score is not None:
                    cols["unknown_score"][i] = float(score[j])
                    cols["unknown_flag"][i] = bool(flag[j])
        return pd.DataFrame(cols).astype(DTYPES)


# ------------------------------------------------------------------------------------------------ output


def check_output_path(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ServingError(f"--out {out}: unknown format {out.suffix or '(none)'}; use one of "
                           f"{', '.join(OUTPUT_SUFFIXES)}")
    return out


def write_table(table: pd.DataFrame, out: str | Path) -> Path:
    """CSV, JSON (a list of records, NaN as null) or parquet by the file ending; written atomically."""
    out = check_output_path(out)
    suffix = out.suffix.lower()
    with atomic_path(out) as tmp:
        if suffix == ".csv":
            table.to_csv(tmp, index=False)
        elif suffix == ".json":
            tmp.write_text(json.dumps(records(table), indent=1))
        else:
            table.to_parquet(tmp, index=False)
    return out


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Plain-Python rows (NA -> None): what the JSON output and the HTTP server return."""
    return json.loads(table.to_json(orient="records"))


# ------------------------------------------------------------------------------------------------ model URIs


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


def _registry_uri(params_path: str | Path | None, model: str) -> str:
    from pipelines.tracking.uri import TrackingUnavailable, check_reachable

    cfg = tracking_config(params_path)
    root = Path(params_path).resolve().parent if params_path is not None and Path(params_path).is_file() else Path(".")
    try:
        uri = check_reachable(cfg, root)
    except TrackingUnavailable as e:
        raise ServingError(f"--model {model}: the model registry is not available. {e}") from None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise ServingError(f"--model {model}: the registry store {db} does not exist (from {uri}); point "
                               "MLFLOW_TRACKING_URI or tracking.uri at the store the model was registered in, or "
                               "give a state folder instead")
    if uri.startswith(("http://", "https://")):  # a registry that dies mid-call fails in seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return uri


def _registered_version(client, model: str, uri: str):
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
            f"--model {model}: not found in the registry {uri} ({e.message.splitlines()[0]}). Registered models: "
            f"{', '.join(known) or 'none'}; use models:/NAME@ALIAS (e.g. models:/lorax-attributor@champion) or "
            f"models:/NAME/VERSION"
        ) from None


def resolve_model(model: str, params_path: str | Path | None = "params.yaml") -> ResolvedModel:
    """A ``--model`` argument -> a local state directory (downloading registered models into a cache).

    Local: a state folder, an MLflow model folder, or a ``lorax train`` output folder (its last task).
    URIs (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``): the registry of ``tracking.uri`` in
    ``params_path`` / ``MLFLOW_TRACKING_URI`` / the project's sqlite store. A registered version is downloaded
    once into ``$LORAX_CACHE_DIR/models`` (default ``~/.cache/lorax``), keyed by registry and version.
    """
    import hashlib

    if not is_model_uri(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise ServingError(f"--model {model}: no such folder, and not a model URI; give a state folder "
                               "(OUT/state/<task>) or models:/lorax-attributor@champion")
        return _local_model(path)
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = _registry_uri(params_path, model)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    mv = _registered_version(client, model, uri) if model.startswith("models:/") else None
    target = f"models:/{mv.name}/{mv.version}" if mv is not None else model
    key = hashlib.sha1(f"{uri}\n{target}\n{mv.source if mv is not None else ''}".encode()).hexdigest()[:16]
    dest = cache_root() / key
    if mv is None or not (dest / "model" / "MLmodel").is_file():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=target, dst_path=str(tmp / "dl")))
        except (MlflowException, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ServingError(f"--model {model}: cannot download it from {uri}: {str(e).splitlines()[0]}") from None
        if not (local / "MLmodel").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ServingError(f"--model {model}: the downloaded artifact has no MLmodel file; not a model")
        shutil.move(str(local), str(tmp / "model"))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    label = f"{model} (version {mv.version})" if mv is not None else model
    return from_model_folder(dest / "model", label)


def model_openset(resolved: ResolvedModel, manifests: str | Path | None = None, device: str = "auto"):
    """The model's open-set calibration: the one it carries, else the state's stored one, else calibrated now (and
    stored) when the manifests of its tasks are at hand; None (logged) when none can be had."""
    from lorax.continual.state import read_info
    from lorax.serving.openset import calibrate_state, current_openset, load_openset, openset_dir

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


def load_predictor(model: str, params_path: str | Path | None = "params.yaml", *, device: str = "auto",
                   crops: int | None = None, batch_size: int | None = None, manifests: str | Path | None = None,
                   openset: bool = True) -> Predictor:
    """A ``--model`` argument (state folder, model folder or ``models:/...`` URI) ready to predict, with its
    open-set calibration (:func:`model_openset`) unless ``openset`` is False."""
    resolved = resolve_model(model, params_path)
    log.info("model %s -> state %s", resolved.source, resolved.state_dir)
    stats = model_openset(resolved, manifests, device) if openset else None
    return Predictor.from_state(resolved.state_dir, device=device, crops=crops, batch_size=batch_size, openset=stats)
