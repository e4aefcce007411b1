"""The images a serving command is given: command-line paths, folders and list files expanded into inputs.

Nothing is opened here (only ``stat``): an entry that looks like an input but must not be used becomes a
:class:`Refused` input, which :class:`lorax.serving.predict.Predictor` turns into an error row with its reason.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lorax.data.images import special_kind
from lorax.serving.errors import ServingError

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst")


def image_suffixes() -> set[str]:
    """File endings Pillow can open (what a folder walk picks up)."""
    return {s.lower() for s in Image.registered_extensions()}


def _read_list(path: Path) -> list[str]:
    """Paths in a list file, one a line (blank lines and ``#`` comments skipped); relative to the list's folder."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            out.append(str(p if p.is_absolute() else path.parent / p))
    return out


@dataclass(frozen=True)
class Refused:
    """An input found but not opened; it becomes an error row with ``reason`` in its place in the output."""

    path: str
    reason: str

    def __str__(self) -> str:
        return self.path


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _walk(folder: Path, suffixes: set[str], follow_links: bool) -> tuple[list[str | Refused], int]:
    """Candidates under ``folder`` (sorted by path) and how many other files were passed over.

    Rules (``lorax predict --help`` says the same): hidden files and folders are skipped silently; a file without an
    image ending is passed over (counted); an entry with an image ending that is not a regular file (a folder, FIFO,
    socket, device) gets a row saying so, and so does any FIFO/socket/device; a symlink whose target leaves
    ``folder`` gets a row unless ``follow_links``; symlinked folders are walked only with ``follow_links`` (each real
    folder once). Nothing is opened here: only ``stat``.
    """
    root = os.path.realpath(folder)
    found: list[str | Refused] = []
    other = 0
    seen = {root}
    todo = [folder]
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            found.append(Refused(str(d), f"folder not readable: {e.strerror or e}"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            path = Path(e.path)
            image_ending = path.suffix.lower() in suffixes
            link = e.is_symlink()
            if link:
                target = os.path.realpath(path)
                if not os.path.exists(target):  # dangling: kept, so the row says "file not found (dangling symlink)"
                    if image_ending:
                        found.append(str(path))
                    else:
                        other += 1
                    continue
                if not follow_links and not _inside(target, root):
                    if image_ending or os.path.isdir(target):
                        found.append(Refused(str(path), f"symlink leaving {folder} (to {target}); pass --follow-links "
                                                        f"to use it"))
                    continue
            try:
                mode = os.stat(path).st_mode
            except OSError as err:
                found.append(Refused(str(path), f"unreadable: {err.strerror or err}"))
                continue
            if stat.S_ISDIR(mode):
                real = os.path.realpath(path)
                # a link to a folder inside this one is not walked without follow_links: its files are reached at
                # their real place; any folder is walked once
                if (not link or follow_links) and real not in seen:
                    seen.add(real)
                    todo.append(path)
                if image_ending:
                    found.append(Refused(str(path), "a directory with an image ending (its images are listed "
                                                    "separately)"))
            elif special_kind(mode):
                found.append(Refused(str(path), f"not a regular file ({special_kind(mode)}); refused without opening "
                                                "it"))
            elif image_ending:
                found.append(str(path))
            else:
                other += 1
    return sorted(found, key=str), other


def collect_inputs(paths: Iterable[str | Path], follow_links: bool = False) -> list[str | Refused]:
    """Expand command-line paths into image paths, in a stable order.

    A folder is walked recursively for files Pillow can open (by ending; the rules for hidden files, non-regular
    files and symlinks are in :func:`_walk`: every entry that looks like an input but is not used is a
    :class:`Refused` row). A ``.txt``/``.lst`` file lists paths, any other path is used as given (a non-image
    becomes an error row; a symlink named on the command line or in a list is the user's choice and is followed).
    A path that does not exist is kept, so it appears in the output as "file not found". Raises
    :class:`ServingError` when nothing is left (every folder empty), naming what was searched.
    """
    suffixes = image_suffixes()
    out: list[str | Refused] = []
    empty: list[str] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found, other = _walk(p, suffixes, follow_links)
            if not found:
                empty.append(f"{p} ({'empty' if not other else f'{other} files, none with an image ending'})")
            out += found
        elif p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            listed = _read_list(p)
            if not listed:
                empty.append(f"{p} (list file with no paths)")
            out += listed
        else:
            out.append(str(p))
    if empty:
        log.warning("no images in: %s", "; ".join(empty))
    if not out:
        raise ServingError(
            f"no images to predict: {'; '.join(empty) or 'no paths given'}. Pass image files, folders holding images "
            f"(searched recursively for .png, .jpg, .webp, .tif, ... files) "
            f"or a .txt file listing image paths"
        )
    return out

