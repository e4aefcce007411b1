"""Dataset manifests: one parquet table per task, one row per image.

Training never walks folders; it reads these tables. Columns (``MANIFEST_COLUMNS``):
``root`` (dataset root as given), ``path`` (image path relative to root), ``task``, ``task_index``,
``split`` (train|val), ``label`` (0 real, 1 fake), ``class_id`` (2*task_index + label), ``subclass``
(CDDB sub-folder or UnivFD category, '' if none), ``sha256`` (of the file bytes), ``width``, ``height``,
``mode`` (original PIL mode).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

MANIFEST_COLUMNS = [
    "root",
    "path",
    "task",
    "task_index",
    "split",
    "label",
    "class_id",
    "subclass",
    "sha256",
    "width",
    "height",
    "mode",
]

REAL, FAKE = 0, 1


def class_id(task_index: int, label: int) -> int:
    """Task i owns class 2i (its real images) and 2i+1 (its fakes)."""
    return 2 * task_index + label


def manifest_path(manifests_dir: str | Path, task: str) -> Path:
    return Path(manifests_dir) / f"{task}.parquet"


def abs_paths(df: pd.DataFrame) -> list[Path]:
    """Absolute image paths of a manifest's rows."""
    return [Path(r) / p for r, p in zip(df["root"], df["path"], strict=True)]


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found; run `lorax data prepare` (or `dvc repro`) first")
    df = pd.read_parquet(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a lorax manifest, columns {missing} are missing; re-run `lorax data prepare`")
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest for {path} lacks columns {missing}")
    tmp = path.with_suffix(".parquet.tmp")
    df[MANIFEST_COLUMNS + [c for c in df.columns if c not in MANIFEST_COLUMNS]].to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def load_stream_manifests(manifests_dir: str | Path, tasks: list[str]) -> dict[str, pd.DataFrame]:
    """Manifests of the given tasks, checked to carry the stream's task indices."""
    out = {}
    for i, t in enumerate(tasks):
        df = read_manifest(manifest_path(manifests_dir, t))
        if len(df) and int(df["task_index"].iloc[0]) != i:
            df = df.copy()
            df["task_index"] = i
            df["class_id"] = [class_id(i, int(lab)) for lab in df["label"]]
        out[t] = df
    return out
