"""Record in ``dvc.lock`` what a driver other than DVC made (the Prefect flows), so the project has one chain.

The flows run the same steps over the same folders as ``dvc repro``. Without a record DVC would see their outputs
as unknown and, at the next ``dvc repro``, delete them and train the task again. ``dvc commit`` of exactly the
stages the flow ran stores their deps and outs as they are, so ``dvc status`` then shows nothing to do and a later
``lorax stream add NAME && dvc repro`` trains only NAME, on top of what the flow learned. DVC runs as a subprocess
(nothing here imports it); a project without ``dvc.yaml`` and ``.dvc/`` is left alone.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

TASK_STAGES = ("synth", "prepare", "train", "select", "evaluate", "register")


def is_dvc_project(root: Path) -> bool:
    return (root / "dvc.yaml").is_file() and (root / ".dvc").is_dir()


def record_stages(root: str | Path, tasks: list[str], ran: list[str] | None = None) -> bool:
    """``dvc commit`` the stream's stages for ``tasks`` (plus check, init and report) that ``dvc.lock`` does not
    record yet or that ran now (``ran``: those tasks; None: all); False when ``root`` is no DVC project or DVC
    failed (logged with the command to run by hand: nothing the flow made is lost). Stages already recorded and not
    run again are left out: DVC would hash their outputs again for nothing."""
    from pipelines.cli.project import _tool, tool_env

    root = Path(root)
    if not is_dvc_project(root):
        return False
    stages = stages_to_record(root, tasks, ran)
    cmd = [_tool("dvc"), "commit", "--force", "--quiet", *stages]
    res = subprocess.run(cmd, cwd=root, env=tool_env(), capture_output=True, text=True)
    if res.returncode != 0:
        log.warning("dvc.lock not updated (%s): %s; run `dvc commit --force` in %s, else the next `dvc repro` "
                    "re-runs these stages", " ".join(cmd[1:3]), (res.stderr or res.stdout).strip()[-500:], root)
        return False
    log.info("dvc.lock records the flow's stages for %s: `dvc status` shows them current", tasks)
    return True


def stages_to_record(root: Path, tasks: list[str], ran: list[str] | None) -> list[str]:
    """The stages of ``tasks`` to commit: those that ran now (with check and report), and any not in dvc.lock."""
    every = ["check", "init", *[f"{s}@{t}" for t in tasks for s in TASK_STAGES], "report"]
    redo = {"check", "report", *[f"{s}@{t}" for t in (tasks if ran is None else ran) for s in TASK_STAGES]}
    known = _locked(root)
    return [s for s in every if s in redo or s not in known]


def _locked(root: Path) -> set[str]:
    """The stages ``dvc.lock`` records (none when it is missing or unreadable: then every stage is committed)."""
    try:
        return set((yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages") or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return set()
