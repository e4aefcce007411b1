"""The registered model: an MLflow pyfunc that loads a lorax state directory from its own artifacts.

A registered version holds, as model artifacts, the state directory after a task (``state``: adapters, heads,
``state.json`` with the settings) and that task's exemplar memory manifest (``memory``); loading
``models:/lorax-attributor@champion`` therefore needs nothing else but the ``lorax`` package (the frozen backbone
is rebuilt from ``state.json``: seeded random init, or ``model.pretrained`` when the state names weights).

``predict`` takes a DataFrame whose ``image`` column (or first column) holds image bytes, base64 text of the
bytes, or file paths, and returns one row per image: the probability of every class (``<task>/real``,
``<task>/fake``), the predicted class and task, and ``fake_probability`` (the summed probability of all fake
classes). Images are centre-cropped to ``model.img_size``, never resized, as in training.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata as md
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
REQUIREMENTS = ("torch", "torchvision", "timm", "peft", "safetensors", "numpy", "pandas", "pyarrow", "pillow",
                "pydantic", "pyyaml", "scikit-learn", "mlflow")


def class_names(tasks: list[str]) -> list[str]:
    """Task i owns class 2i (its real images) and 2i+1 (its fakes)."""
    return [f"{t}/{kind}" for t in tasks for kind in ("real", "fake")]


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
    """Per-image class probabilities from the state directory in the model's artifacts."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import torch

        from lorax.continual.state import load_state

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.method, self.info = load_state(context.artifacts["state"], device=device)
        self.method.eval()
        self.device = torch.device(device)
        self.crop = int(self.info["params"]["model"]["img_size"])
        self.max_pixels = int(self.info["params"]["data"]["max_image_pixels"])
        self.classes = class_names(list(self.info["tasks"]))

    def _tensor(self, value: Any, row: int):
        from lorax.continual.trainer import _norm
        from lorax.data.dataset import crop_boxes, to_tensor
        from lorax.data.images import crop_image, open_image, to_rgb_array

        img = open_image(_image_bytes(value, row), self.max_pixels, name=f"row {row}")
        box = crop_boxes(img.width, img.height, self.crop)[0]
        mean, std = _norm(self.method)
        return to_tensor(to_rgb_array(crop_image(img, box, f"row {row}"), f"row {row}"), mean, std)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame({"image": list(model_input)})
        if model_input.shape[1] == 0:
            raise ValueError("model input has no columns; pass a DataFrame with an 'image' column")
        col = "image" if "image" in model_input.columns else model_input.columns[0]
        values = list(model_input[col])
        probs = []
        batch = int((params or {}).get("batch_size", 64))
        with torch.no_grad():
            for start in range(0, len(values), batch):
                x = torch.stack([self._tensor(v, start + k) for k, v in enumerate(values[start:start + batch])])
                logits = self.method(x.to(self.device))[0].float()
                probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        p = np.concatenate(probs) if probs else np.zeros((0, len(self.classes)), dtype=np.float32)
        out = pd.DataFrame(p, columns=self.classes)
        pred = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=int)
        out["predicted_class"] = [self.classes[i] for i in pred]
        out["predicted_task"] = [self.classes[i].rsplit("/", 1)[0] for i in pred]
        out["fake_probability"] = p[:, 1::2].sum(axis=1) if len(p) else np.zeros(0)
        return out


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
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write a pyfunc model folder at ``path`` whose artifacts are the state dir (and memory manifest)."""
    path = Path(path)
    artifacts = {"state": str(Path(state_dir).resolve())}
    if memory_path is not None and Path(memory_path).is_file():
        artifacts["memory"] = str(Path(memory_path).resolve())
    extra = ["open_clip_torch"] if _uses_open_clip(state_dir) else []
    _skip_mlflow_package_scan()
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        pip_requirements=pip_requirements(extra),
        metadata={"lorax": "attributor", "needs": "the lorax package (pip install -e <lorax repo>)",
                  **(metadata or {})},
    )
    return path


def _uses_open_clip(state_dir: str | Path) -> bool:
    import json

    info = json.loads((Path(state_dir) / "state.json").read_text())
    return str(info.get("params", {}).get("model", {}).get("backbone", "")).startswith("open_clip")
