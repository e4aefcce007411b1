"""The environment of a run, as MLflow tags: package versions, git commit, dvc.lock hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "timm", "peft", "open_clip_torch", "mlflow", "dvc", "prefect", "pandas", "numpy", "lorax")


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            continue
    return out


def git_commit(root: str | Path) -> tuple[str | None, bool]:
    """(HEAD commit, whether the tree has uncommitted changes to tracked files); (None, False) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, False
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False


def file_sha256(path: str | Path) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def environment_tags(root: str | Path = ".") -> dict[str, str]:
    """Tags that pin down what produced a run (MLflow tag values are strings)."""
    tags = {f"env.{k}": v for k, v in package_versions().items()}
    tags["env.python"] = platform.python_version()
    commit, dirty = git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(dirty).lower()
    lock = file_sha256(Path(root) / "dvc.lock")
    if lock:
        tags["dvc.lock.sha256"] = lock
    params = file_sha256(Path(root) / "params.yaml")
    if params:
        tags["params.yaml.sha256"] = params
    return tags


def dvc_lock_hashes(root: str | Path = ".") -> dict[str, str]:
    """``{stage: md5 of its outputs}`` from dvc.lock (what DVC recorded), for the report's tags."""
    import yaml

    p = Path(root) / "dvc.lock"
    if not p.is_file():
        return {}
    lock = yaml.safe_load(p.read_text()) or {}
    out = {}
    for stage, entry in (lock.get("stages") or {}).items():
        md5s = [o.get("md5", "") for o in entry.get("outs", []) if isinstance(o, dict)]
        if md5s:
            out[stage] = ",".join(md5s)
    return out
