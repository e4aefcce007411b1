"""Fixtures of the pipeline tests: tiny projects on disk, real DVC in a temporary git repo, a real Prefect API."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorax.config import set_by_path

from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[2]

BIN = Path(sys.executable).parent


def tool_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", **extra})
    return env


def write_project(root: Path, stream: list[str], **overrides: Any) -> Path:
    """A project folder whose params.yaml is the real one shrunk (tiny zoo and model), with relative data paths."""
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    ov = dict(TINY_OVERRIDES)
    ov.update({"data.root": "data/zoo", "data.manifests": "data/manifests", "tracking.uri": None,
               "stream": {t: {"prev": "init" if i == 0 else stream[i - 1]} for i, t in enumerate(stream)}})
    ov.update({k.replace("__", "."): v for k, v in overrides.items()})
    for k, v in ov.items():
        set_by_path(raw, k, v)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def dvc_project(root: Path, stream: list[str], **overrides: Any) -> Path:
    """``write_project`` + the repo's dvc.yaml, its code (the stages declare it as dependencies, and run it) and plot
    templates in a fresh git repo with DVC initialised; the code is committed, as in the project's own repo."""
    write_project(root, stream, **overrides)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for pkg in ("lorax", "pipelines"):
        # (not pipelines/detection/: the detector's pipeline, which a test adds when it wants it)
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "detection"))
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    env = tool_env()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run(["git", "add", "lorax", "pipelines", ".gitignore", ".dvcignore"], cwd=root, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "code"], cwd=root, check=True, env=env)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([str(BIN / "dvc"), "config", "core.analytics", "false"], cwd=root, check=True, env=env)
    return root


def dvc(root: Path, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    res = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=tool_env(**extra_env), capture_output=True,
                         text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def stages_ran(output: str) -> list[str]:
    """Stage names from DVC's "Running stage 'x':" lines, in order."""
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (a real server in a subprocess) for every flow test of the session."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
