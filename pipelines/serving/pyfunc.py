"""The registered model: an MLflow pyfunc that loads a lorax state directory from its own artifacts.

A registered version holds, as model artifacts, the state directory after a task (``state``: adapters, heads,
``state.json`` with the settings), that task's exemplar memory manifest (``memory``) and, when the state was
calibrated, its open-set calibration (``openset``, :mod:`lorax.serving.openset`). Loading
``models:/lorax-attributor@champion`` therefore needs nothing else but the ``lorax`` package (the frozen backbone
is rebuilt from ``state.json``: seeded random init, or ``model.pretrained`` when the state names weights).

``predict`` takes a DataFrame with an ``image`` column holding image bytes or base64 text of the bytes and an
optional ``name`` column labelling the rows; any other column, or no ``image`` column, refuses the request as a
whole (one line naming the expected columns). A list, an array or MLflow's ``inputs`` list is taken as the ``image``
column. It returns one row per input, in order, in the row schema of ``lorax predict``
(:data:`lorax.serving.schema.COLUMNS`: status and error, verdict, fake probability and threshold, generator, ``top``
classes, the prediction set ``generators``, unknown flag and score, ``model_version``; ``path`` is the row's name); a model saved with a detector
(``save_attributor(detector=...)``) adds the detector's columns and ``agreement``. ``model_version`` is the
``model_version`` of the model config it was loaded with (``mlflow.pyfunc.load_model(uri, model_config=
{"model_version": N})``), else null. The same code as ``lorax predict`` scores the images, so ``mlflow models
serve`` answers exactly what the command writes.

Trust boundary (:mod:`lorax.serving.rows`): file paths are refused unless the operator allowed a folder
(``LORAX_SERVE_IMAGE_ROOT`` when the model loads, else ``image_root`` given to :func:`save_attributor`); a request
cannot change it. Every value that cannot be used (a refused or missing path, invalid base64, a non-image, a
number) is an error row with the reason; the other rows are scored. A request with no rows gets no predictions
(an empty ``dataframe_split`` and ``dataframe_records: []`` alike); one whose columns are not ``image`` (and
``name``) is refused as a whole, by an :class:`~mlflow.exceptions.MlflowException` whose JSON carries one line
and no stack trace (MLflow adds a trace to any other exception, so none escapes ``predict``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from lorax.serving.rows import Row, describe, image_root, parse_value

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
INPUT_COLUMNS = ("image", "name")
REQUIREMENTS = ("torch", "torchvision", "timm", "peft", "safetensors", "numpy", "pandas", "pyarrow", "pillow",
                "pydantic", "pyyaml", "scikit-learn", "mlflow")


class LoraxAttributor(mlflow.pyfunc.PythonModel):
    """``lorax predict`` behind MLflow's pyfunc interface (see the module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import torch

        from lorax.serving.openset import load_openset
        from lorax.serving.predict import Predictor

        device = "cuda" if torch.cuda.is_available() else "cpu"
        state = context.artifacts["state"]
        openset = context.artifacts.get("openset")
        stats = load_openset(state, openset) if openset else None
        self.predictor = Predictor.from_state(state, device=device, openset=stats)
        if context.artifacts.get("detector"):  # bundled at publish time: its verdict beside ours
            from lorax.serving.detector import DetectorScorer

            self.predictor.detector = DetectorScorer.from_file(context.artifacts["detector"], device=device,
                                                               batch_size=self.predictor.batch_size)
        config = getattr(context, "model_config", None) or {}
        version = config.get("model_version")
        self.predictor.model_version = None if version is None else str(version)
        self.image_root = image_root(config.get("image_root"))
        log.info("lorax attributor loaded: %s", describe(self.image_root))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per input value (see the module docstring); a request without an ``image`` column, or with
        another column, is refused.

        ``model_input`` is usually a DataFrame, but a list, array or dict of columns (MLflow's ``inputs`` and
        ``instances`` forms) works too; the hint stays DataFrame so MLflow infers no signature from it."""
        from pipelines.serving.guard import request_params

        try:
            return self._score(_as_frame(model_input),
                               _batch_size(params or request_params(), self.predictor.batch_size))
        except MlflowException:
            raise
        except Exception:  # a fault of ours, not the caller's: the trace goes to the server log, not the response
            log.exception("scoring a request failed")
            raise MlflowException("the server failed to score this request (an internal error, logged on the "
                                  "server); retry, or report it to the operator") from None

    def _score(self, frame: pd.DataFrame, batch_size: int) -> pd.DataFrame:
        from lorax.serving.detector import DETECTOR_COLUMNS, DETECTOR_DTYPES
        from lorax.serving.schema import COLUMNS, DTYPES, empty_top

        columns, dtypes = COLUMNS, DTYPES
        if self.predictor.detector is not None:  # the bundled detector's columns too
            columns, dtypes = COLUMNS + DETECTOR_COLUMNS, {**DTYPES, **DETECTOR_DTYPES}

        rows: list[Row] = [parse_value(v, self.image_root) for v in frame["image"]]
        n = len(rows)
        if "name" in frame.columns:
            names = ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in frame["name"]]
        else:
            names = [r.path if r.path is not None else f"row {i}" for i, r in enumerate(rows)]
        good = [i for i, r in enumerate(rows) if r.error is None]
        cols: dict[str, list[Any]] = {c: [None] * n for c in columns}
        cols["path"], cols["status"], cols["error"] = names, ["error"] * n, [r.error for r in rows]
        cols["top"] = [empty_top() for _ in range(n)]
        cols["model_version"] = [self.predictor.model_version] * n
        if good:
            p = self.predictor
            old, p.batch_size = p.batch_size, batch_size
            try:
                res = p.predict([rows[i].data for i in good], [names[i] for i in good], progress=False)
            finally:
                p.batch_size = old
            for c in columns:
                for i, v in zip(good, res.table[c].tolist(), strict=True):
                    cols[c][i] = v
        out = pd.DataFrame(cols).astype(dtypes)
        # plain Python values (None for missing): JSON-serialisable by the scoring server
        return out.astype(object).where(out.notna(), None)


def _refuse(message: str) -> MlflowException:
    """A request-level error: MLflow answers 400 with this one line and no stack trace."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _as_frame(model_input: Any) -> pd.DataFrame:
    """The request as a DataFrame (``dataframe_split``/``records`` give one; ``inputs``/``instances`` a list,
    an array or a dict of columns)."""
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, dict):
        columns = {str(k): v if isinstance(v, list) else list(np.atleast_1d(np.asarray(v, dtype=object)))
                   for k, v in model_input.items()}
        try:
            frame = pd.DataFrame(columns)
        except ValueError:
            raise _refuse("the request's columns have different lengths; send one 'image' value per row") from None
    else:
        values = np.asarray(model_input if not isinstance(model_input, (str, bytes)) else [model_input], dtype=object)
        if values.ndim == 0:
            values = values.reshape(1)
        if values.ndim > 2:
            raise _refuse(f"the request is a {values.ndim}-dimensional array; send a DataFrame with an 'image' "
                          "column (base64 of the image bytes)")
        if values.ndim == 2 and values.shape[1] == 1:  # one value per row, nested: still the image column
            values = values[:, 0]
        frame = pd.DataFrame({"image": list(values)}) if values.ndim == 1 else pd.DataFrame(values)
    if len(frame) == 0:  # no rows, in any form (an empty split, empty records): no predictions
        return pd.DataFrame({"image": []})
    if frame.shape[1] == 0:
        raise _refuse("the request has no columns; send a DataFrame with an 'image' column (base64 of the image "
                      "bytes), e.g. {\"dataframe_split\": {\"columns\": [\"image\"], \"data\": [[\"iVBOR...\"]]}}")
    got = [str(c) for c in frame.columns]
    if "image" not in got or set(got) - set(INPUT_COLUMNS):
        shown = [c if len(c) <= 40 else c[:40] + "..." for c in got[:8]] + (["..."] if len(got) > 8 else [])
        raise _refuse(f"expected columns 'image' (base64 of the image bytes) and optional 'name'; got {shown}")
    return frame


def _batch_size(params: dict[str, Any] | None, default: int) -> int:
    raw = (params or {}).get("batch_size", default)
    try:
        size = int(raw)
    except (TypeError, ValueError):
        size = 0
    if not 1 <= size <= 4096:
        raise _refuse(f"params.batch_size: expected an integer from 1 to 4096, got {raw!r}")
    return size


def pip_requirements(extra: list[str] | None = None) -> list[str]:
    """Pinned requirements of the installed versions (given explicitly: MLflow's inference costs seconds)."""
    reqs = []
    for name in REQUIREMENTS + tuple(extra or ()):
        try:
            reqs.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            continue
    return reqs


def _skip_mlflow_package_scan() -> None:
    """MLflow maps every installed module to its package (seconds) just to warn about version mismatches of
    the requirements we pin from this very environment; an empty map makes it read versions directly."""
    try:
        from mlflow.utils import requirements_utils as ru

        if getattr(ru, "_MODULES_TO_PACKAGES", ()) is None:
            ru._MODULES_TO_PACKAGES = {}
    except ImportError:
        pass


def save_attributor(path: str | Path, state_dir: str | Path, memory_path: str | Path | None = None,
                    metadata: dict[str, Any] | None = None, openset_dir: str | Path | None = None,
                    image_root: str | Path | None = None, detector: str | Path | None = None) -> Path:
    """Write a pyfunc model folder at ``path`` whose artifacts are the state dir (and memory manifest).

    The open-set calibration (``openset_dir``, default the state's ``<state_dir>.openset`` when it exists and
    belongs to this state) is packed too, so the served model reports unknown-generator scores. ``image_root``
    (saved in the model's config) lets the served model read image paths under that folder; by default it reads
    none, and ``LORAX_SERVE_IMAGE_ROOT`` at load time overrides it either way. ``detector`` (a
    ``detector.safetensors`` or a folder holding one) is bundled as the ``detector`` artifact: the served model
    then adds the detector's verdict and ``agreement`` (:mod:`lorax.serving.detector`) to every row. The saved
    ``model_version`` is null: whoever loads a registered version passes its number (``model_config``).
    """
    from lorax.serving.openset import current_openset, openset_dir as default_openset

    path = Path(path)
    artifacts = {"state": str(Path(state_dir).resolve())}
    if memory_path is not None and Path(memory_path).is_file():
        artifacts["memory"] = str(Path(memory_path).resolve())
    os_dir = Path(openset_dir) if openset_dir is not None else default_openset(state_dir)
    if current_openset(state_dir, os_dir) is not None:
        artifacts["openset"] = str(os_dir.resolve())
    if detector is not None:
        from lorax.serving.detector import detector_file

        artifacts["detector"] = str(detector_file(detector).resolve())
    extra = ["open_clip_torch"] if _uses_open_clip(state_dir) else []
    _skip_mlflow_package_scan()
    with _no_signature_warning():
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(MODEL_CODE),
            artifacts=artifacts,
            pip_requirements=pip_requirements(extra),
            metadata={"lorax": "attributor", "needs": "the lorax package (pip install -e <lorax repo>)",
                      **(metadata or {})},
            # both keys saved, so a load may set them (MLflow ignores a load-time key the saved config lacks)
            model_config={"image_root": os.path.abspath(os.path.expanduser(image_root)) if image_root else None,
                          "model_version": None},
        )
    return path


class _DropSignatureWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to infer model signature: Type hint")


@contextlib.contextmanager
def _no_signature_warning() -> Iterator[None]:
    """The model has no signature on purpose: its ``image`` column takes bytes, base64 text or paths (a schema
    would make MLflow's enforcement refuse some of them), so MLflow's 'cannot infer a signature' warning, printed
    by every registration, says nothing a user can act on."""
    logger, flt = logging.getLogger("mlflow.pyfunc"), _DropSignatureWarning()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _uses_open_clip(state_dir: str | Path) -> bool:
    import json

    info = json.loads((Path(state_dir) / "state.json").read_text())
    return str(info.get("params", {}).get("model", {}).get("backbone", "")).startswith("open_clip")
