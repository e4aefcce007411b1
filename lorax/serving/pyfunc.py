"""The registered model: an MLflow pyfunc that loads a lorax state directory from its own artifacts.

A registered version holds, as model artifacts, the state directory after a task (``state``: adapters, heads,
``state.json`` with the settings), that task's exemplar memory manifest (``memory``) and, when the state was
calibrated, its open-set calibration (``openset``, :mod:`lorax.serving.openset`). Loading
``models:/lorax-attributor@champion`` therefore needs nothing else but the ``lorax`` package (the frozen backbone
is rebuilt from ``state.json``: seeded random init, or ``model.pretrained`` when the state names weights).

``predict`` takes a DataFrame whose ``image`` column (or first column) holds image bytes, base64 text of the
bytes, or file paths (an optional ``name`` column labels the rows), and returns one row per image: the
probability of every class (``<task>/real``, ``<task>/fake``), then the fields of ``lorax predict``
(:data:`lorax.serving.predict.COLUMNS`: verdict, generator, probability, fake probability, top-3 classes,
unknown-generator score and flag; ``path`` is the row's name) and ``predicted_task``. The same code as
``lorax predict`` scores the images, so ``mlflow models serve`` answers exactly what the command writes.
A value that is neither bytes, base64 nor a file is a malformed request (``ValueError`` naming the row); bytes
that are not a usable image give an error row with the reason, as in ``lorax predict``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.metadata as md
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
REQUIREMENTS = ("torch", "torchvision", "timm", "peft", "safetensors", "numpy", "pandas", "pyarrow", "pillow",
                "pydantic", "pyyaml", "scikit-learn", "mlflow")


def _image_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"row {row}: expected image bytes, base64 text or a file path, got {type(value).__name__}")
    if len(value) < 4096 and Path(value).is_file():
        return Path(value).read_bytes()
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"row {row}: {value[:60]!r} is neither an existing file nor base64 image bytes") from None


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
        self.classes = self.predictor.classes

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from lorax.continual.metrics import softmax
        from lorax.serving.predict import COLUMNS

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame({"image": list(model_input)})
        if model_input.shape[1] == 0:
            raise ValueError("model input has no columns; pass a DataFrame with an 'image' column")
        col = "image" if "image" in model_input.columns else model_input.columns[0]
        values = list(model_input[col])
        data = [_image_bytes(v, i) for i, v in enumerate(values)]
        if "name" in model_input.columns:
            names = [str(n) for n in model_input["name"]]
        else:
            names = [v if isinstance(v, str) and len(v) < 4096 and Path(v).is_file() else f"row {i}"
                     for i, v in enumerate(values)]
        p = self.predictor
        old = p.batch_size
        p.batch_size = int((params or {}).get("batch_size", old))
        try:
            res = p.predict(data, names, progress=False)
        finally:
            p.batch_size = old
        probs = np.full(res.logits.shape, np.nan)
        ok = (res.table["status"] == "ok").to_numpy()
        if ok.any():
            probs[ok] = softmax(res.logits[ok])
        out = pd.concat([pd.DataFrame(probs, columns=self.classes), res.table[COLUMNS]], axis=1)
        out["predicted_task"] = [c.rsplit("/", 1)[0] if isinstance(c, str) else None
                                 for c in res.table["predicted_class"]]
        # plain Python values (None for missing): JSON-serialisable by the scoring server
        return out.astype(object).where(out.notna(), None)


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
                    metadata: dict[str, Any] | None = None, openset_dir: str | Path | None = None) -> Path:
    """Write a pyfunc model folder at ``path`` whose artifacts are the state dir (and memory manifest).

    The open-set calibration (``openset_dir``, default the state's ``<state_dir>.openset`` when it exists and
    belongs to this state) is packed too, so the served model reports unknown-generator scores.
    """
    from lorax.serving.openset import current_openset, openset_dir as default_openset

    path = Path(path)
    artifacts = {"state": str(Path(state_dir).resolve())}
    if memory_path is not None and Path(memory_path).is_file():
        artifacts["memory"] = str(Path(memory_path).resolve())
    os_dir = Path(openset_dir) if openset_dir is not None else default_openset(state_dir)
    if current_openset(state_dir, os_dir) is not None:
        artifacts["openset"] = str(os_dir.resolve())
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
