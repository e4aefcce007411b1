"""Editing the stream: append a task to params.yaml's ``stream`` (``lorax stream add``, the new-generator flow)."""

from __future__ import annotations

import re
from pathlib import Path

from lorax.config import ConfigError, load_params
from lorax.data.layouts import list_tasks, scan_task
from pipelines.layout import INIT
from pipelines.params_text import block_span


def is_task_name(name: str) -> bool:
    """A task name is a DVC stage key and a folder name: letters, digits, '_', '-', '.', and not 'init'."""
    return name != INIT and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name) is not None


def check_task_name(name: str) -> None:
    """:func:`is_task_name`, or a ConfigError saying how to name the folder."""
    if not is_task_name(name):
        raise ConfigError(f"task name {name!r}: use letters, digits, '_', '-', '.' (and not 'init'); rename the "
                          "folder")


def append_to_stream(params_path: str | Path, name: str | None = None, *, root: str | Path = ".") -> str:
    """Append task ``name`` (``None``: the next zoo generator not yet in the stream) to params.yaml's stream.

    The file is edited as text so its comments and layout stay; the result is validated and the file is left
    unchanged if it does not load. Returns the name added.
    """
    path = Path(params_path)
    params = load_params(path)
    tasks = params.tasks
    if name is None:
        left = [g for g in params.zoo.order if g not in tasks]
        if not left:
            raise ConfigError(f"{path}: every zoo generator ({params.zoo.order}) is already in the stream")
        name = left[0]
    if name in tasks:
        raise ConfigError(f"{path}: task {name!r} is already in the stream ({tasks})")
    check_task_name(name)
    if params.data.source == "builtin" and name not in params.zoo.order:
        raise ConfigError(
            f"{name!r} is not a zoo generator and data.source is builtin; zoo generators not in the stream yet: "
            f"{[g for g in params.zoo.order if g not in tasks] or 'none'}. To add a folder of your own, set "
            f"data.source: folder and data.root to the dataset (`lorax init --root FOLDER`)"
        )
    if params.data.source == "folder":
        data_root = Path(root) / params.data.root
        folder = data_root / name
        if not folder.is_dir():
            found = list_tasks(data_root) if data_root.is_dir() else "none (data.root does not exist)"
            raise ConfigError(f"{folder}: no such task folder under data.root; task folders there: {found}. Put the "
                              f"task's images in {folder}/{{train,val}}/{{0_real,1_fake}}/ first, or fix the name")
        scan_task(data_root, name, params.data.layout)  # as `prepare` will read it: a missing split or class fails now
    lines = path.read_text().splitlines(keepends=True)
    try:
        _, last, indent = block_span(lines, "stream")
    except ConfigError:
        raise ConfigError(f"{path}: no block 'stream:' at the top level; add one with the first task") from None
    if last is None:
        raise ConfigError(f"{path}: the stream block is empty")
    new_line = f"{indent}{name}: {{prev: {tasks[-1]}}}\n"
    if not lines[last].endswith("\n"):
        lines[last] += "\n"
    lines.insert(last + 1, new_line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    try:
        check = load_params(tmp)
    except ConfigError as e:
        tmp.unlink()
        raise ConfigError(f"adding {name!r} would make {path} invalid; left unchanged:\n{e}") from None
    if check.tasks != tasks + [name]:
        tmp.unlink()
        raise ConfigError(f"{path}: could not append {name!r} to the stream block (got {check.tasks}); edit it by hand")
    tmp.replace(path)
    return name
