"""``lorax init``: a params.yaml that runs the user's own folder under ``dvc repro`` as is.

A profile's file (``realworld``: params.realworld.yaml; ``zoo``/``default``: params.yaml's built-in settings) is
edited as text, so its comments still say why each setting is what it is; only the project's own keys change
(:data:`OWN_KEYS`). The folder is checked with the same code ``prepare`` runs before it is written into the file, so
a missing task or class folder fails here, in one line, instead of at the first stage.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lorax.config import ZOO_ORDER, ConfigError, Params, load_params, params_to_dict
from lorax.data import layouts
from lorax.data.images import DataError, inspect_image
from pipelines.layout import INIT
from pipelines.params_text import replace_block, section_line, set_value
from pipelines.stream_edit import check_task_name
from pipelines.tracking.flat import flatten

PROFILES = {"realworld": "params.realworld.yaml", "zoo": "params.yaml", "default": "params.yaml"}
# The settings that are the project's own: everything else is the profile's.
OWN_KEYS = ("data.source", "data.root", "data.manifests", "stream", "tracking.scenario", "detect.train_tasks")
CODE_ROOT = Path(__file__).resolve().parents[1]  # where the profiles ship, for a params file outside the project
MARK = "# lorax init:"  # the lines this module writes; replaced, not stacked, by the next init


@dataclass
class InitResult:
    path: Path
    params: Params
    profile_file: Path
    backup: Path | None = None
    notes: list[str] = field(default_factory=list)


def slug(name: str) -> str:
    """A folder name as a scenario / folder name: letters, digits, '_', '-', '.'."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", name).strip("-.") or "data"


def stored_root(folder: Path, project: Path) -> str:
    """``folder`` as data.root: relative to ``project`` when inside or beside it (a copy of both keeps working),
    else absolute."""
    folder, project = folder.resolve(), project.resolve()
    if folder.is_relative_to(project.parent) and project.parent != project:
        return os.path.relpath(folder, project)
    return str(folder)


def check_folder(root: Path, tasks: list[str] | None, params: Params, notes: list[str]) -> list[str]:
    """The tasks (None: every task folder, in name order), each checked as ``prepare`` will read it (folders only,
    plus one sample image per task: a crop larger than the images is a note here, a failed ``prepare`` later)."""
    tasks = layouts.check_tasks(root, tasks)
    for t in tasks:
        check_task_name(t)
        lay = layouts.scan_task(root, t, params.data.layout)
        sample = layouts.list_entries(lay.class_dirs[0].path)[0]
        try:
            inspect_image(sample, params.data.max_image_pixels, params.model.img_size)
        except DataError as e:
            notes.append(f"{e} (a sample of task {t}: `prepare` quarantines such files; the profile crops "
                         f"model.img_size={params.model.img_size} px)")
    return tasks


def _changed_settings(params: Params) -> list[str]:
    """Settings of ``params`` apart from the project's own that differ from the built-in defaults."""
    defaults = flatten(params_to_dict(Params(stream={ZOO_ORDER[0]: {"prev": INIT}})))
    mine = flatten(params_to_dict(params))
    return sorted(k for k in mine if mine[k] != defaults.get(k) and not k.startswith(OWN_KEYS))


def profile_file(profile: str, project: Path) -> tuple[Path, Params]:
    """The profile's file (the project's, else the one shipped with the code) and its settings. The zoo profile is
    params.yaml's built-in settings: a params.yaml whose other settings were changed (e.g. written from another
    profile) is refused rather than silently kept."""
    if profile not in PROFILES:
        raise ConfigError(f"--profile {profile!r}: unknown; allowed: {', '.join(PROFILES)}")
    name = PROFILES[profile]
    candidates = [p for p in dict.fromkeys([project / name, CODE_ROOT / name]) if p.is_file()]
    if not candidates:
        raise ConfigError(f"{project / name}: profile file not found; run `lorax init` from the project root")
    changed: list[str] = []
    for path in candidates:
        params = load_params(path)
        changed = _changed_settings(params) if name == "params.yaml" else []
        if not changed:
            return path, params
    raise ConfigError(f"{candidates[0]}: not the built-in settings any more ({', '.join(changed[:6])}"
                      f"{' ...' if len(changed) > 6 else ''} differ): restore it (`git checkout {name}`) before "
                      f"`lorax init --profile {profile}`, or pick --profile realworld")


def _comment_above_stream(lines: list[str], profile: str, text: str) -> None:
    """Replace the profile's own note on its stream (comment lines just above ``stream:``) by ``text``."""
    k = section_line(lines, "stream")
    j = k
    while j > 0 and lines[j - 1].startswith((f"# {profile}:", MARK)):
        j -= 1
    lines[j:k] = [f"{MARK} {text}\n"]


def edit_profile(text: str, *, profile: str, root: str, tasks: list[str], scenario: str, manifests: str,
                 command: str) -> str:
    """The profile's text with the project's own keys set; every other line (comments included) kept."""
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith(MARK):
        lines.pop(0)
    set_value(lines, "data.source", "folder")
    set_value(lines, "data.root", root, comment="lorax init: your folder, <task>/{train,val}/{0_real,1_fake}/")
    set_value(lines, "data.manifests", manifests)
    replace_block(lines, "stream", [f"{t}: {{prev: {INIT if k == 0 else tasks[k - 1]}}}" for k, t in enumerate(tasks)])
    _comment_above_stream(lines, profile, f"the task folders of {root}, in the order given")
    set_value(lines, "tracking.scenario", scenario)
    set_value(lines, "detect.train_tasks", tasks[:1])
    header = [f"{MARK} written by `{command}` from {PROFILES[profile]}:\n",
              f"{MARK} data.source, data.root, data.manifests, stream, tracking.scenario and detect.train_tasks are\n",
              f"{MARK} yours; the rest is the profile's, and its comments say why.\n"]
    return "".join(header + lines)


def has_run(project: Path) -> bool:
    """The stream of ``project`` has been run (DVC's record or trained states exist)."""
    return (project / "dvc.lock").is_file() or (project / "state").is_dir()


def _backup(path: Path) -> Path:
    bak = path.with_name(path.name + ".bak")
    k = 1
    while bak.exists():
        bak, k = path.with_name(f"{path.name}.bak{k}"), k + 1
    shutil.copy2(path, bak)
    return bak


def init_params(params_path: str | Path, root: str | Path, tasks: list[str] | None = None, profile: str = "realworld",
                force: bool = False, command: str = "lorax init") -> InitResult:
    """Write ``params_path`` for the folder ``root`` (its ``tasks`` in this order; None: every task folder, by name).

    The project is the params file's folder. Refuses to replace the params of a stream that has run unless
    ``force``, and then keeps a backup. The result is validated before the file is replaced."""
    path = Path(params_path)
    project = path.parent.resolve()
    source, base = profile_file(profile, project)
    folder = Path(os.path.abspath(project / root))  # (a relative root is the project's, as DVC reads it)
    if not folder.is_dir():
        raise ConfigError(f"--root {root}: no such folder ({folder}); give the folder that holds one folder per "
                          "task, <task>/{train,val}/{0_real,1_fake}/")
    result = InitResult(path, base, source)
    tasks = check_folder(folder, tasks, base, result.notes)
    stored = stored_root(folder, project)
    name = slug(folder.resolve().name)
    text = edit_profile(source.read_text(), profile=profile, root=stored, tasks=tasks, scenario=f"{name}-{len(tasks)}",
                        manifests=f"data/manifests_{name}", command=command)
    if path.exists() and has_run(project):
        if not force:
            raise ConfigError(f"{path}: its stream has already run here (dvc.lock or state/ exists); "
                              "`lorax init ... --force` replaces it and keeps a copy as params.yaml.bak")
        result.backup = _backup(path)
        result.notes.append(f"kept the previous settings as {result.backup.name}; the previous run's outputs "
                            "(state/, memory/, dvc.lock) stay until `dvc repro` replaces them")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    try:
        result.params = load_params(tmp)
    except ConfigError as e:
        tmp.unlink()
        raise ConfigError(f"{source.name} edited for {folder} does not load; {path} left unchanged:\n{e}") from None
    p = result.params
    if (p.tasks, p.data.root, p.detect.train_tasks) != (tasks, stored, tasks[:1]):
        tmp.unlink()
        raise ConfigError(f"{source}: could not set the stream, data.root or detect.train_tasks as text; edit it by "
                          "hand")
    tmp.replace(path)
    return result
