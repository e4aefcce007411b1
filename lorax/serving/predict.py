"""Attribute images with a trained state: ``lorax predict``, the served pyfunc and ``lorax scan`` share this code.

Every image goes through the same safe loader and RGB rules as training (:mod:`lorax.data.images`) and the same
crop policy: never resized; an image larger than the crop is scored on ``eval.crops`` deterministic crops
(:func:`lorax.data.dataset.crop_boxes`; 1 = the centre crop, as in evaluation) whose logits and super-features
are averaged; an image smaller than the crop is an error row. A file that cannot be used becomes a row with
``status = "error"`` and the reason; it never stops the run.

A trace method (``trace``, ``lorax+trace``; :mod:`lorax.serving.trace`) also reads the evaluation's fixed grid of
native-resolution patches of the decoded image (mirror-padded when smaller than a patch, never resized) through every
task's expert; ``trace`` reads no crops, so any image size is served.

Output columns (one row per input, in input order) are :data:`COLUMNS`, the row schema of
:mod:`lorax.serving.schema` (verdict, fake probability and its threshold, generator, a fixed-length ``top`` list,
the prediction set ``generators``, unknown flag and score, model version), shared with the served model and the evaluation's predictions.

With a detector attached (``Predictor.detector``, ``lorax predict --detector``), its columns
(:data:`lorax.serving.detector.DETECTOR_COLUMNS`: its fake probability and verdict, and ``agreement``) follow.

Inputs come from :func:`lorax.serving.inputs.collect_inputs`; a ``--model`` argument becomes a Predictor in
:mod:`lorax.serving.load` (local models) or :mod:`pipelines.serving.download` (registry URIs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lorax.continual import metrics as M
from lorax.continual.metrics import class_names
from lorax.data.dataset import crop_boxes, to_tensor
from lorax.data.images import BadImage, DataError, crop_image, open_image, to_rgb_array
from lorax.serving.errors import ServingError
from lorax.serving.inputs import Refused
from lorax.serving.schema import COLUMNS, DTYPES, decided_rows, empty_top, write_csv
from lorax.serving.trace import TraceItem, grid_patches, trace_logits_and_features, trace_settings
from lorax.utils.io import atomic_path

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".csv", ".json", ".parquet")


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
        # trace methods (lorax/serving/trace.py): (patch, patches) of the native patch grid; lorax+trace reads crops
        self.trace = trace_settings(params) if getattr(method, "trace_experts", False) else None
        self.uses_crops = self.trace is None or bool(getattr(method, "frozen_task_adapters", False))
        self.mean, self.std = image_norm(method) if self.uses_crops else (None, None)
        self.openset = openset
        self.verdict = getattr(method, "verdict", None)  # the stored real/fake decision (None: argmax)
        self.sets = getattr(method, "sets", None)  # the calibrated prediction sets (None: no generators column)
        self.detector = None  # a lorax.serving.detector.DetectorScorer: its verdict is added beside ours
        self.model_version: str | None = None  # the registry version loaded (None: a local state folder)

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
    def load(self, source: str | Path | bytes | Refused, name: str) -> tuple[torch.Tensor | TraceItem, int, int]:
        """(crops x C x H x W tensor, width, height) of one image; :class:`BadImage` says why not. A trace method
        gets a :class:`~lorax.serving.trace.TraceItem`: the image's native patch grid (any size: an image smaller
        than the patch is mirror-padded) and, for ``lorax+trace``, its crops.

        A :class:`Refused` input is never opened; a path must be a regular file (checked from ``stat``, so a FIFO
        or device cannot block or stream forever).
        """
        if isinstance(source, Refused):
            raise BadImage(name, source.reason)
        if not isinstance(source, bytes) and not Path(source).exists():
            raise BadImage(name, "file not found" + (" (dangling symlink)" if Path(source).is_symlink() else ""))
        img = open_image(source, self.max_pixels, name=name)
        w, h = img.size
        crops = None
        if self.uses_crops:
            if w < self.crop or h < self.crop:
                raise BadImage(name, f"image {w}x{h} is smaller than the model's crop {self.crop}; crop, never resize")
            boxes = crop_boxes(w, h, self.crop, self.crops)
            crops = torch.stack([to_tensor(to_rgb_array(crop_image(img, box, name), name), self.mean, self.std)
                                 for box in boxes])
        if self.trace is not None:
            return TraceItem(grid_patches(to_rgb_array(img, name), *self.trace), crops), w, h
        return crops, w, h

    # -- inference -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run_batch(self, xs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        from lorax.continual.methods import logits_and_features  # a model is loaded: its modules are imported

        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else torch.autocast("cpu", enabled=False)
        if self.trace is not None:  # every expert over the patch grids (+ lorax+trace's adapters over the crops)
            logits, feats = trace_logits_and_features(self.method, xs, self.device, ctx)
            return logits.numpy(), feats.numpy()
        x = torch.cat(xs).to(self.device)
        with ctx:
            logits, feats = logits_and_features(self.method, x)
        logits, feats = logits.float().cpu(), feats.float().cpu()
        n = [len(t) for t in xs]  # crops per image: average logits and features over them
        logits = torch.stack([c.mean(0) for c in torch.split(logits, n)])
        feats = torch.stack([c.mean(0) for c in torch.split(feats, n)])
        return logits.numpy(), feats.numpy()

    def predict(self, sources: Sequence[str | Path | bytes | Refused], names: Sequence[str] | None = None,
                progress: bool = True, keep_features: bool = False) -> Prediction:
        """Score ``sources`` (paths, image bytes or :class:`Refused` entries of
        :func:`~lorax.serving.inputs.collect_inputs`, which become error rows; ``names`` label them in the ``path``
        column).

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
        fake_p = np.full(n, np.nan)
        n_labels = len(self.tasks) + 1
        set_s = np.full((n, n_labels), np.nan)
        errors: list[str | None] = [None] * n
        sizes = np.full((n, 2), -1, dtype=np.int64)
        pending: list[tuple[int, Any]] = []  # (row, crops tensor or TraceItem)

        def flush() -> None:
            nonlocal feats
            if not pending:
                return
            lg, ft = self._run_batch([t for _, t in pending])
            rows = [i for i, _ in pending]
            logits[rows] = lg
            if self.verdict is not None:
                fake_p[rows] = self.verdict.fake_probability(ft)
            if self.openset is not None:
                scores[rows] = self.openset.score(ft)
            if self.sets is not None:
                set_s[rows] = self.sets.scores(M.softmax(lg), ft)
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
        table = self._table(names, logits, fake_p, scores, errors, sizes, set_s)
        if self.detector is not None:
            from lorax.serving.detector import with_detector

            table = with_detector(table, self.detector.score(sources, names))
        return Prediction(table, logits, feats)

    def _table(self, names: list[str], logits: np.ndarray, fake_score: np.ndarray, scores: np.ndarray,
               errors: list[str | None], sizes: np.ndarray, set_scores: np.ndarray | None = None) -> pd.DataFrame:
        n = len(names)
        ok = np.array([e is None for e in errors], dtype=bool)
        cols: dict[str, list[Any]] = {c: [None] * n for c in COLUMNS}
        cols["path"] = list(names)
        cols["status"] = ["ok" if o else "error" for o in ok]
        cols["error"] = list(errors)
        cols["width"] = [int(w) if w >= 0 else None for w in sizes[:, 0]]
        cols["height"] = [int(h) if h >= 0 else None for h in sizes[:, 1]]
        cols["top"] = [empty_top() for _ in range(n)]
        cols["model_version"] = [self.model_version] * n
        rows = np.flatnonzero(ok)
        if len(rows):
            probs = M.softmax(logits[rows])
            verdict = self.verdict
            score = over = None
            if self.openset is not None:
                score = scores[rows]
                over = score > self.openset.threshold
            sets = self.sets if set_scores is not None else None
            _, decided = decided_rows(probs, self.classes, None if verdict is None else fake_score[rows],
                                      None if verdict is None else verdict.threshold, score, over,
                                      None if sets is None else set_scores[rows],
                                      None if sets is None else sets.thresholds)
            for c, values in decided.items():
                for i, v in zip(rows, values, strict=True):
                    cols[c][i] = v
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
            write_csv(table, tmp)
        elif suffix == ".json":
            tmp.write_text(json.dumps(records(table), indent=1))
        else:
            table.to_parquet(tmp, index=False)
    return out


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Plain-Python rows (NA -> None): what the JSON output and the HTTP server return."""
    return json.loads(table.to_json(orient="records"))

