"""Tiny synthetic real/fake generators for the detector tests (PIL PNGs + lorax manifests in a tmp folder).

Real images are smooth colour fields with mild noise; each "generator" makes fakes by nearest-neighbour upsampling a
smaller image and stamping a periodic pattern on it (its fingerprint): period 2 checkerboards for ``checker_a`` and
``checker_b`` (different strength and phase: an easy transfer), vertical stripes of period 4 for ``stripes``.
``TINY_DETECT`` / ``CLI_TINY_DETECT``: one-epoch detector settings (as ``tiny_params`` overrides / CLI ``-S``) for
the tests that only need a detector run to exist (the ablation grid, the detect stage).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lorax.data.manifest import write_manifest
from tests.helpers import tiny_cli_sets

GENERATORS = {"checker_a": ("checker", 28.0, 0), "checker_b": ("checker", 20.0, 1), "stripes": ("stripes", 24.0, 0)}
TINY_DETECT = {"detect__train_tasks": ["checker_a"], "detect__blocks": 1, "detect__epochs": 1, "detect__batch_size": 16,
               "detect__blur_sigmas": [2], "detect__jpeg_qualities": [50]}
CLI_TINY_DETECT = ["-S", "detect.blocks=1", "-S", "detect.epochs=1", "-S", "detect.batch_size=16", *tiny_cli_sets()]


def _real(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(40, 200, 3)
    grad = rng.uniform(-60, 60, (2, 3))
    img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + rng.normal(0, 4, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _fake(rng: np.random.Generator, size: int, kind: str, amp: float, phase: int) -> np.ndarray:
    small = _real(rng, size // 2)
    img = np.repeat(np.repeat(small, 2, 0), 2, 1).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = ((yy + xx + phase) % 2) * 2 - 1 if kind == "checker" else ((xx // 2) % 2) * 2 - 1
    return np.clip(img + amp * pattern[..., None], 0, 255).astype(np.uint8)


def make_zoo(root: Path, n_train: int = 24, n_val: int = 10, size: int = 24, seed: int = 0,
             generators: dict | None = None) -> Path:
    """Write images under ``root/images`` and one manifest per generator under ``root/manifests``."""
    generators = generators or GENERATORS
    img_root, man_dir = root / "images", root / "manifests"
    for ti, (task, (kind, amp, phase)) in enumerate(generators.items()):
        rng = np.random.default_rng([seed, ti])
        rows = []
        for split, n in (("train", n_train), ("val", n_val)):
            for label in (0, 1):
                for i in range(n):
                    arr = _real(rng, size) if label == 0 else _fake(rng, size, kind, amp, phase)
                    rel = f"{task}/{split}/{label}_{'real' if label == 0 else 'fake'}/{i:03d}.png"
                    (img_root / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(img_root / rel)
                    rows.append({"root": str(img_root), "path": rel, "task": task, "task_index": ti, "split": split,
                                 "label": label, "class_id": 2 * ti + label, "subclass": "",
                                 "sha256": hashlib.sha256((img_root / rel).read_bytes()).hexdigest(),
                                 "width": size, "height": size, "mode": "RGB"})
        write_manifest(pd.DataFrame(rows), man_dir / f"{task}.parquet")
    return man_dir
