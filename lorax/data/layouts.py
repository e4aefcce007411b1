"""Find the class folders of a task in the dataset layouts lorax reads.

* ``cddb``: ``root/{task}/{train,val}/[{subclass}/]{0_real,1_fake}/*`` (the CDDB benchmark, the built-in zoo).
* ``univfd``: ``root/{generator}/[{category}/]{0_real,1_fake}/*`` (UnivFD / CNNSpot); no split folders, so
  preparation splits by content hash (see :mod:`lorax.data.prepare`).
* ``genimage``: ``root/{generator}/{train,val}/{ai,nature}/*`` (GenImage; ``ai`` = fake, ``nature`` = real).

``auto`` looks at each task folder and picks the one layout it matches. Only folders are read here; files are
listed, never opened. Other folders at the split level (CDDB's ``test``) are ignored and reported in ``notes``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lorax.data.images import DataError

LAYOUTS = ("cddb", "univfd", "genimage")
SPLITS = ("train", "val")
CLASS_NAMES = {
    "cddb": {"0_real": 0, "1_fake": 1},
    "univfd": {"0_real": 0, "1_fake": 1},
    "genimage": {"nature": 0, "ai": 1},
}
EXPECTED = {
    "cddb": "{task}/{train,val}/[{subclass}/]{0_real,1_fake}/",
    "univfd": "{task}/[{category}/]{0_real,1_fake}/",
    "genimage": "{task}/{train,val}/{ai,nature}/",
}


@dataclass(frozen=True)
class ClassDir:
    """One folder of images that all share a split (None = to be assigned), a label and a subclass."""

    path: Path
    split: str | None
    label: int
    subclass: str = ""


@dataclass
class TaskLayout:
    task: str
    layout: str
    class_dirs: list[ClassDir]
    notes: list[str] = field(default_factory=list)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name != "__pycache__"


def _subdirs(p: Path) -> list[Path]:
    return sorted(c for c in p.iterdir() if c.is_dir() and _visible(c))


def list_tasks(root: str | Path) -> list[str]:
    """Task folders directly under ``root`` (sorted); files such as README or manifest.csv are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found; pass --root or set data.root (run `lorax data synth` "
                        "to build the built-in zoo)")
    return [p.name for p in _subdirs(root)]


def check_tasks(root: str | Path, tasks: list[str] | None) -> list[str]:
    """``tasks`` (None: every task folder, sorted) once each, all present under ``root``; else one error naming the
    missing folders and the tasks found (a typo fails before any work)."""
    root = Path(root)
    found = list_tasks(root)
    if tasks is None:
        tasks = found
        if not tasks:
            raise DataError(f"{root}: no task folders found; expected one folder per task (generator) in it")
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise DataError(f"tasks listed twice: {dup}; each task must appear once in the stream")
    missing = [t for t in tasks if t not in found]
    if missing:
        raise DataError(
            f"{root}: task folders {missing} not found; tasks in {root}: {found or 'none'}. "
            "Fix the task names (params.yaml stream / --tasks) or the root (data.root / --root)"
        )
    return list(tasks)


def list_entries(class_dir: Path) -> list[Path]:
    """Every visible entry of a class folder, sorted: files and also things that are not (quarantined later)."""
    with os.scandir(class_dir) as it:
        return sorted(Path(e.path) for e in it if not e.name.startswith("."))


def _has_classes(p: Path, names: dict[str, int]) -> bool:
    return any((p / n).is_dir() for n in names)


def detect_layout(task_dir: Path) -> str:
    """The layout a task folder matches; :class:`DataError` naming the folder when it matches none."""
    subs = _subdirs(task_dir)
    names = {s.name for s in subs}
    splits = [task_dir / s for s in SPLITS if s in names]
    if splits:
        if any(_has_classes(s, CLASS_NAMES["genimage"]) for s in splits):
            return "genimage"
        if any(_has_classes(s, CLASS_NAMES["cddb"]) or any(_has_classes(c, CLASS_NAMES["cddb"]) for c in _subdirs(s))
               for s in splits):
            return "cddb"
    if _has_classes(task_dir, CLASS_NAMES["univfd"]) or any(_has_classes(s, CLASS_NAMES["univfd"]) for s in subs):
        return "univfd"
    raise DataError(
        f"{task_dir}: matches no known dataset layout (found folders {sorted(names) or 'none'}); expected one of "
        + "; ".join(f"{k}: {v}" for k, v in EXPECTED.items())
        + ". Rearrange the folder or set data.layout / --layout"
    )


def _class_dirs_in(parent: Path, names: dict[str, int], split: str | None, subclass: str) -> list[ClassDir]:
    return [ClassDir(parent / n, split, lab, subclass) for n, lab in sorted(names.items()) if (parent / n).is_dir()]


def _scan_level(parent: Path, names: dict[str, int], split: str | None, notes: list[str]) -> list[ClassDir]:
    """Class folders directly in ``parent`` plus those one sub-folder (subclass / category) down."""
    out = _class_dirs_in(parent, names, split, "")
    for sub in _subdirs(parent):
        if sub.name in names:
            continue
        found = _class_dirs_in(sub, names, split, sub.name)
        if found:
            out.extend(found)
        else:
            notes.append(f"ignored folder {sub} (no {'/'.join(names)} inside)")
    return out


def scan_task(root: str | Path, task: str, layout: str = "auto") -> TaskLayout:
    """Class folders of ``root/task`` in ``layout`` (``auto`` detects it); errors name the folder and the fix."""
    root = Path(root)
    task_dir = root / task
    if not task_dir.is_dir():
        existing = list_tasks(root)
        raise DataError(
            f"{task_dir}: task folder not found; tasks in {root}: {existing or 'none'}. "
            "Fix the task name (params.yaml stream / --tasks) or the root (data.root / --root)"
        )
    if layout not in ("auto", *LAYOUTS):
        raise DataError(f"data.layout: unknown layout {layout!r}; allowed: auto, {', '.join(LAYOUTS)}")
    chosen = detect_layout(task_dir) if layout == "auto" else layout
    names = CLASS_NAMES[chosen]
    notes: list[str] = []
    dirs: list[ClassDir] = []
    if chosen == "univfd":
        dirs = _scan_level(task_dir, names, None, notes)
    else:
        for s in SPLITS:
            if not (task_dir / s).is_dir():
                raise DataError(
                    f"{task_dir / s}: split folder missing; the {chosen} layout is {EXPECTED[chosen]} and both "
                    "train and val are needed. Add it (or use the univfd layout, which splits by content hash)"
                )
            if chosen == "genimage":
                dirs.extend(_class_dirs_in(task_dir / s, names, s, ""))
            else:
                dirs.extend(_scan_level(task_dir / s, names, s, notes))
        extra = sorted(p.name for p in _subdirs(task_dir) if p.name not in SPLITS)
        if extra:
            notes.append(f"ignored folders {extra} in {task_dir} (only {'/'.join(SPLITS)} are read)")
    if not dirs:
        raise DataError(
            f"{task_dir}: no class folders found for the {chosen} layout; expected {EXPECTED[chosen]}. "
            "Rearrange the folder or pick another data.layout"
        )
    _check_classes(task_dir, chosen, dirs)
    return TaskLayout(task, chosen, dirs, notes)


def _check_classes(task_dir: Path, layout: str, dirs: list[ClassDir]) -> None:
    names = {lab: n for n, lab in CLASS_NAMES[layout].items()}
    for d in dirs:
        if not list_entries(d.path):
            raise DataError(f"{d.path}: empty class folder; put its images there or remove the folder")
    splits = sorted({d.split for d in dirs}, key=str) if layout != "univfd" else [None]
    for s in splits:
        have = {d.label for d in dirs if d.split == s}
        for lab, n in names.items():
            if lab not in have:
                where = task_dir / s if s else task_dir
                raise DataError(
                    f"{where}: no {n}/ folder; every split of a task needs both {' and '.join(names.values())} "
                    f"images (expected layout {EXPECTED[layout]}). Add the missing class folder"
                )
