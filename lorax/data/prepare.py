"""``lorax data prepare``: scan a dataset root once and write one parquet manifest per task.

Every file is read and decoded once here (:func:`lorax.data.images.inspect_image`), so training and evaluation
never walk folders or meet a broken file. Outputs in ``out_dir`` (nothing in the source folders is touched):

* ``{task}.parquet``: the manifest (:mod:`lorax.data.manifest` columns plus ``pixel_sha256``).
* ``{task}.quarantine.csv``: ``file,reason`` for every file left out (always written, header only when clean).

Rules:

* Bad files (empty, truncated, not an image, unreadable, decompression bomb, smaller than the crop, unsupported
  mode) are quarantined. ``data.strict`` makes any of them fatal; a share above ``data.bad_file_limit`` fails.
* ``sha256`` is of the file bytes; leakage is judged on ``pixel_sha256`` (the decoded, RGB-converted pixels), so
  a re-encoded copy (another PNG compression level, stripped metadata) is caught too. The same pixels in train
  and val of a task, or in this task and another task's manifest already in ``out_dir``, is a :class:`DataError`
  naming both files, unless ``data.check_leakage`` is false.
* Layouts without split folders (univfd) are split deterministically by content: an image goes to val when the
  first 64 bits of its ``pixel_sha256`` fall in the lowest ``VAL_SHARE`` (20%) of the range, so identical
  copies always land in the same split and a re-run gives the same split. Each class keeps at least one image in
  each split.
* Both classes must have images in both splits of every task.
* A file that a symlink (the file's or a folder's) takes outside the dataset root is quarantined, unread, unless
  ``data.follow_links``: manifest readers refuse such rows too (:func:`lorax.data.manifest.safe_paths`).
* Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from lorax.config import DataConfig
from lorax.data import layouts
from lorax.data.images import BadImage, DataError, ImageInfo, inspect_image
from lorax.data.manifest import (
    MANIFEST_COLUMNS,
    class_id,
    link_out_of,
    manifest_path,
    read_manifest,
    write_manifest,
)
from lorax.utils.io import write_text

__all__ = ["DataError", "PrepareResult", "prepare_task", "prepare_tasks", "quarantine_path", "VAL_SHARE"]

VAL_SHARE = 0.2
_SHOW = 5  # files named in an error message


def quarantine_path(out_dir: str | Path, task: str) -> Path:
    return Path(out_dir) / f"{task}.quarantine.csv"


@dataclass
class PrepareResult:
    """What one task's preparation produced; :meth:`summary` is the line the CLI prints."""

    task: str
    task_index: int
    layout: str
    manifest: Path
    quarantine: Path
    counts: dict[tuple[str, int], int]
    bad: dict[str, str] = field(default_factory=dict)  # file -> reason
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detected: bool = False  # layout found by ``auto``

    @property
    def n_images(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        c = self.counts
        parts = [f"{s} {c.get((s, 0), 0)} real / {c.get((s, 1), 0)} fake" for s in layouts.SPLITS]
        how = "auto-detected " if self.detected else ""
        line = f"{self.task} [task {self.task_index}, {how}{self.layout} layout]: {', '.join(parts)}"
        if self.bad:
            kinds = Counter(r.split(":")[0].split(" (")[0] for r in self.bad.values())
            line += f"; {len(self.bad)} quarantined ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})"
            line += f", see {self.quarantine}"
        else:
            line += "; 0 quarantined"
        line += f" -> {self.manifest} ({self.seconds:.1f}s)"
        for n in self.notes:
            line += f"\n  note: {n}"
        return line


def _inspect(args: tuple[str, int, int]) -> ImageInfo | BadImage:
    path, max_pixels, min_size = args
    try:
        return inspect_image(path, max_pixels, min_size)
    except BadImage as e:
        return e


def _inspect_all(files: list[Path], max_pixels: int, min_size: int, workers: int) -> list[ImageInfo | BadImage]:
    jobs = [(str(f), max_pixels, min_size) for f in files]
    if workers <= 1 or len(jobs) < 64:
        return [_inspect(j) for j in jobs]
    # fork: workers only decode (PIL, hashlib, numpy), nothing that forking a torch process could upset
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as ex:
        return list(ex.map(_inspect, jobs, chunksize=32))


def _auto_workers(n_files: int) -> int:
    return 1 if n_files < 2000 else max(1, min(8, (os.cpu_count() or 1)))




def _write_quarantine(path: Path, bad: dict[str, str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "reason"])
    for f in sorted(bad):
        w.writerow([f, bad[f]])
    write_text(path, buf.getvalue())


def _hash_split(df: pd.DataFrame) -> pd.Series:
    """Deterministic content split for layouts without split folders (see module docstring)."""
    score = df["pixel_sha256"].map(lambda h: int(h[:16], 16) / 2**64)
    split = pd.Series(["val" if s < VAL_SHARE else "train" for s in score], index=df.index, dtype=object)
    for _, idx in df.groupby("label").groups.items():
        if len(idx) < 2:
            continue
        sc = score.loc[idx]
        if not (split.loc[idx] == "val").any():
            split.loc[sc.idxmin()] = "val"
        if not (split.loc[idx] == "train").any():
            split.loc[sc.idxmax()] = "train"
    return split


def _pairs(a: pd.DataFrame, b: pd.DataFrame, key: str = "pixel_sha256") -> list[tuple[str, str]]:
    m = a[[key, "file"]].merge(b[[key, "file"]], on=key, suffixes=("_a", "_b"))
    return list(zip(m["file_a"], m["file_b"], strict=True))


def _leak_message(what: str, pairs: list[tuple[str, str]]) -> str:
    shown = "\n".join(f"  {a}  ==  {b}" for a, b in pairs[:_SHOW])
    more = f"\n  ... and {len(pairs) - _SHOW} more pairs" if len(pairs) > _SHOW else ""
    return (
        f"leakage: {len(pairs)} images with identical pixels {what}:\n{shown}{more}\n"
        "Fix: delete one copy of each pair from the dataset, or set data.check_leakage: false to accept it"
    )


def _check_leakage(task: str, df: pd.DataFrame, out_dir: Path, cfg: DataConfig, notes: list[str],
                   root: Path) -> None:
    within = _pairs(df[df["split"] == "train"], df[df["split"] == "val"])
    others: list[tuple[str, list[tuple[str, str]]]] = []
    for mp in sorted(out_dir.glob("*.parquet")):
        if mp.name == f"{task}.parquet":
            continue
        try:
            other = read_manifest(mp, root)
        except ValueError:
            notes.append(f"skipped {mp} in the leakage check: not a lorax manifest")
            continue
        other = other.assign(file=[str(Path(r) / p) for r, p in zip(other["root"], other["path"], strict=True)])
        key = "pixel_sha256" if "pixel_sha256" in other.columns else "sha256"
        pairs = _pairs(df, other, key)
        if pairs:
            others.append((f"in task {task!r} and in {mp} (task {mp.stem!r})", pairs))
    if not cfg.check_leakage:
        n = len(within) + sum(len(p) for _, p in others)
        if n:
            notes.append(f"{n} duplicated images across splits/tasks accepted (data.check_leakage is false)")
        return
    if within:
        raise DataError(_leak_message(f"in both train and val of task {task!r}", within))
    if others:
        what, pairs = others[0]
        raise DataError(
            _leak_message(what, pairs) + f" (or remove {out_dir} manifests that belong to another dataset)"
        )


def prepare_task(
    root: str | Path,
    task: str,
    task_index: int,
    out_dir: str | Path,
    cfg: DataConfig,
    crop: int,
) -> PrepareResult:
    """Scan, verify and write the manifest and quarantine report of one task (DVC calls this per task).

    Below 2000 files one process decodes them, else up to 8 in parallel.
    """
    t0 = time.perf_counter()
    root, out_dir = Path(root), Path(out_dir)
    lay = layouts.scan_task(root, task, cfg.layout)
    notes = list(lay.notes)
    entries = [(cd, f) for cd in lay.class_dirs for f in layouts.list_entries(cd.path)]
    bad = {} if cfg.follow_links else _links_out(entries, root)
    entries_in = [(cd, f) for cd, f in entries if str(f) not in bad]
    results = _inspect_all([f for _, f in entries_in], cfg.max_image_pixels, crop,
                           _auto_workers(len(entries_in)))

    rows = []
    for (cd, f), res in zip(entries_in, results, strict=True):
        if isinstance(res, BadImage):
            bad[str(f)] = res.reason
            continue
        rows.append({
            "root": str(root),
            "path": f.relative_to(root).as_posix(),
            "task": task,
            "task_index": task_index,
            "split": cd.split,
            "label": cd.label,
            "class_id": class_id(task_index, cd.label),
            "subclass": cd.subclass,
            "sha256": res.sha256,
            "width": res.width,
            "height": res.height,
            "mode": res.mode,
            "pixel_sha256": res.pixel_sha256,
        })
    q_path = quarantine_path(out_dir, task)
    _write_quarantine(q_path, bad)
    n_all = len(entries)
    if bad and cfg.strict:
        first = sorted(bad)[0]
        raise DataError(
            f"{task}: {len(bad)} bad files and data.strict is on; first: {first}: {bad[first]}. "
            f"All listed in {q_path}. Fix or remove them, or run without --strict to quarantine them"
        )
    if n_all and len(bad) / n_all > cfg.bad_file_limit:
        raise DataError(
            f"{task}: {len(bad)} of {n_all} files ({100 * len(bad) / n_all:.1f}%) are bad, above "
            f"data.bad_file_limit={cfg.bad_file_limit}; they are listed in {q_path}. Fix or remove them, "
            "or raise data.bad_file_limit"
        )

    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS + ["pixel_sha256"])
    df = df.astype({"task_index": "int64", "label": "int64", "class_id": "int64", "width": "int64",
                    "height": "int64"})
    if lay.layout == "univfd" and len(df):
        df["split"] = _hash_split(df)
        notes.append(f"no split folders: split by content hash ({100 * (1 - VAL_SHARE):.0f}/{100 * VAL_SHARE:.0f})")
    _check_nonempty(task, root / task, df, bad, lay)
    df["file"] = [str(root / p) for p in df["path"]]
    _check_leakage(task, df, out_dir, cfg, notes, root)
    df = df.drop(columns="file").sort_values(["split", "label", "path"], kind="stable").reset_index(drop=True)
    counts = {(s, int(lab)): int(n) for (s, lab), n in df.groupby(["split", "label"]).size().items()}
    out = write_manifest(df, manifest_path(out_dir, task), data_root=root)
    return PrepareResult(
        task, task_index, lay.layout, out, q_path, counts, bad, notes, time.perf_counter() - t0, cfg.layout == "auto"
    )


def _links_out(entries: list[tuple[layouts.ClassDir, Path]], root: Path) -> dict[str, str]:
    """Quarantine reasons of the entries a symlink takes outside ``root`` (data.follow_links is off)."""
    real_root = os.path.realpath(root)
    out = {}
    for _, f in entries:
        target = link_out_of(f, real_root)
        if target is not None:
            out[str(f)] = (f"symlink out of the dataset root (to {target}); set data.follow_links: true to use it")
    return out


def _check_nonempty(task: str, task_dir: Path, df: pd.DataFrame, bad: dict[str, str], lay: layouts.TaskLayout) -> None:
    names = {lab: n for n, lab in layouts.CLASS_NAMES[lay.layout].items()}
    for s in layouts.SPLITS:
        for lab, n in names.items():
            if not ((df["split"] == s) & (df["label"] == lab)).any():
                where = f"{task_dir}/{s}/" if lay.layout != "univfd" else f"{task_dir}/[category/]"
                nbad = sum(1 for f in bad if f"/{n}/" in f and (lay.layout == "univfd" or f"/{s}/" in f))
                why = f" ({nbad} of its files were quarantined)" if nbad else ""
                raise DataError(
                    f"{where}{n}: task {task!r} has no usable {n} images in {s}{why}; both classes are needed in "
                    f"train and val. Add images there"
                    + (" (the univfd layout needs at least 2 per class for its hash split)"
                       if lay.layout == "univfd" else "")
                )


def prepare_tasks(
    root: str | Path,
    tasks: list[str] | None,
    out_dir: str | Path,
    cfg: DataConfig,
    crop: int,
) -> list[PrepareResult]:
    """Prepare ``tasks`` in order (their position is the task index); None = every task folder, sorted.

    All task folders are checked to exist before any work, so a typo fails at once and lists the tasks found.
    """
    root = Path(root)
    tasks = layouts.check_tasks(root, tasks)
    return [prepare_task(root, t, i, out_dir, cfg, crop) for i, t in enumerate(tasks)]
