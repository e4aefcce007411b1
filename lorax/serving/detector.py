"""The real/fake detector's verdict beside the attributor's: ``lorax predict --detector`` and the served model.

The attributor (:mod:`lorax.serving.predict`) answers "real, or which known generator"; it only knows its stream's
generators. The detector (:mod:`lorax.detect`, CLIP-MoLE) answers "real or fake" and is trained for transfer to
generators it never saw. Both verdicts are reported; neither overrides the other:

* ``verdict`` stays the attributor's;
* ``detector_fake_probability`` / ``detector_verdict`` are the detector's (its sigmoid output against the threshold
  fitted on its training generators' val split); ``detector_error`` says why an image could not be scored by it
  (e.g. smaller than the detector's crop) when the attributor could;
* ``agreement`` is ``agree`` or ``disagree`` where both scored the image, empty otherwise, so conflicts are seen.

The checkpoint is read from safetensors only (:func:`lorax.detect.detector.load_detector`: tensors + JSON settings;
nothing is unpickled). Images go through the same safe loader and crop rule as the attributor (never resized);
``detect.eval_crops`` deterministic crops (1: the centre) are scored and their logits averaged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lorax.config import DataConfig
from lorax.data.dataset import crop_boxes, to_tensor
from lorax.data.images import BadImage, DataError, crop_image, open_image, to_rgb_array
from lorax.serving.errors import ServingError
from lorax.serving.inputs import Refused

log = logging.getLogger(__name__)

CHECKPOINT = "detector.safetensors"
DETECTOR_COLUMNS = ["detector_fake_probability", "detector_verdict", "detector_error", "agreement"]
DETECTOR_DTYPES = {"detector_fake_probability": "Float64", "detector_verdict": "string", "detector_error": "string",
                   "agreement": "string"}


def detector_file(path: str | Path) -> Path:
    """A ``--detector`` path made a checkpoint file: the ``.safetensors`` itself, or a folder holding
    ``detector.safetensors`` (``reports/detect``, a ``lorax detect --out`` folder, a downloaded registry version)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise ServingError(f"--detector {path}: no detector checkpoint there ({p} not found); give "
                           f"reports/detect/{CHECKPOINT}, a `lorax detect --out` folder, or "
                           "models:/lorax-detector@champion")
    if p.suffix != ".safetensors":
        raise ServingError(f"--detector {path}: expected a .safetensors checkpoint (lorax never unpickles a model)")
    return p


class DetectorScorer:
    """A loaded detector and its threshold; ``score(sources, names)`` gives the detector's columns, one row each."""

    def __init__(self, det: torch.nn.Module, threshold: float, info: dict[str, Any], device: torch.device,
                 batch_size: int = 64, source: str = "") -> None:
        self.det, self.threshold, self.info, self.device = det.eval(), float(threshold), info, device
        self.crop = int(info["model"].img_size)
        self.crops = int(info["detect"].eval_crops)
        self.batch_size = int(batch_size)
        self.max_pixels = DataConfig().max_image_pixels
        self.mean, self.std = det.backbone.info.mean, det.backbone.info.std
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path, device: str = "auto", batch_size: int = 64,
                  source: str = "") -> DetectorScorer:
        """Rebuild the detector saved at ``path`` (a safetensors file or a folder holding one)."""
        from lorax.continual.batches import resolve_device
        from lorax.detect.detector import load_detector

        file = detector_file(path)
        dev = resolve_device(device)
        try:
            det, threshold, info = load_detector(file, device=dev)
        except ValueError as e:
            raise ServingError(f"--detector {source or path}: {e}") from None
        log.info("detector %s (%s on %s, threshold %.4f) from %s", source or path, info["method"],
                 info["model"].backbone, threshold, file)
        return cls(det, threshold, info, dev, batch_size, source or str(path))

    def _load(self, src: str | Path | bytes | Refused, name: str) -> torch.Tensor:
        if isinstance(src, Refused):
            raise BadImage(name, src.reason)
        if not isinstance(src, bytes) and not Path(src).exists():
            raise BadImage(name, "file not found")
        img = open_image(src, self.max_pixels, name=name)
        w, h = img.size
        if w < self.crop or h < self.crop:
            raise BadImage(name, f"image {w}x{h} is smaller than the detector's crop {self.crop}; crop, never resize")
        return torch.stack([to_tensor(to_rgb_array(crop_image(img, box, name), name), self.mean, self.std)
                            for box in crop_boxes(w, h, self.crop, self.crops)])

    @torch.no_grad()
    def _run(self, xs: list[torch.Tensor]) -> np.ndarray:
        logits = self.det(torch.cat(xs).to(self.device)).float().cpu()
        per_image = torch.stack([c.mean() for c in torch.split(logits, [len(x) for x in xs])])
        return torch.sigmoid(per_image).numpy()

    def score(self, sources: Sequence[str | Path | bytes | Refused], names: Sequence[str]) -> pd.DataFrame:
        """``detector_fake_probability``, ``detector_verdict`` and ``detector_error`` of each source, in order."""
        n = len(sources)
        prob: list[float | None] = [None] * n
        errors: list[str | None] = [None] * n
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if pending:
                for (i, _), p in zip(pending, self._run([x for _, x in pending]), strict=True):
                    prob[i] = float(p)
                pending.clear()

        for i, (src, name) in enumerate(zip(sources, names, strict=True)):
            try:
                pending.append((i, self._load(src, str(name))))
            except BadImage as e:
                errors[i] = e.reason
            except (DataError, OSError, ValueError) as e:
                errors[i] = str(e)
            if sum(len(x) for _, x in pending) >= self.batch_size:
                flush()
        flush()
        verdict = [None if p is None else ("fake" if p >= self.threshold else "real") for p in prob]
        return pd.DataFrame({"detector_fake_probability": prob, "detector_verdict": verdict,
                             "detector_error": errors}).astype({k: DETECTOR_DTYPES[k] for k in DETECTOR_DTYPES
                                                                if k != "agreement"})


def with_detector(table: pd.DataFrame, detector: pd.DataFrame) -> pd.DataFrame:
    """The attributor's table with the detector's columns and ``agreement`` (``agree``/``disagree`` where both
    scored the image; empty otherwise) appended; ``verdict`` is left as the attributor's."""
    if len(table) != len(detector):
        raise ValueError(f"{len(detector)} detector rows for {len(table)} attributor rows")
    out = pd.concat([table.reset_index(drop=True), detector.reset_index(drop=True)], axis=1)
    both = out["verdict"].notna() & out["detector_verdict"].notna()
    agree = (out["verdict"] == out["detector_verdict"]).fillna(False)
    out["agreement"] = pd.Series(np.where(agree, "agree", "disagree"), dtype="string").where(both, pd.NA)
    return out.astype(DETECTOR_DTYPES)
