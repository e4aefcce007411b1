"""The unit that must not be split between folds: a dataset's own ``group`` of each image, else the image.

Crops of one photo, or the images several generators drew from one prompt, are near copies in what they show: a
cross-fit that puts one in the fitting folds and another in the scored fold is optimistic (the real-image sets'
crops of one photo gave a cross-fitted balanced accuracy 20 points above the validation split's). A dataset says
which images belong together in a ``manifest.csv`` beside its task folders, with ``path`` (relative to the dataset
root) and ``group`` columns (``../shared/data/realworld`` and ``../shared/data/t2i`` have one); without it every
file is its own group.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

GROUPS_FILE = "manifest.csv"


@lru_cache(maxsize=8)
def _dataset_groups(root: str) -> dict[str, str]:
    f = Path(root) / GROUPS_FILE
    if not f.is_file():
        return {}
    try:
        m = pd.read_csv(f, usecols=["path", "group"], dtype=str)
    except (ValueError, OSError, pd.errors.ParserError):  # no such columns, unreadable: every file its own group
        return {}
    return {str(Path(p)): str(g) for p, g in zip(m["path"], m["group"], strict=True) if isinstance(g, str) and g}


def row_groups(rows: pd.DataFrame) -> np.ndarray:
    """One group label per manifest row (``root`` + ``path``): the dataset's ``group`` where its manifest.csv names
    the file, else the file's own path."""
    out = []
    for root, path in zip(rows["root"].astype(str), rows["path"].astype(str), strict=True):
        known = _dataset_groups(str(Path(root).resolve()))
        out.append(known.get(str(Path(path)), f"file:{Path(root) / path}"))
    return np.asarray(out, dtype=object)
