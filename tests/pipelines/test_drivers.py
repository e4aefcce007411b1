"""The drivers stay thin: lorax/ never imports DVC or Prefect; the schedule is an interval deployment."""

from __future__ import annotations

import ast
from datetime import timedelta
from pathlib import Path

import pytest

from lorax.ops_commands import parse_every
from tests.pipelines.conftest import REPO

# lorax/detect/commands.py imports the detect stage's tracked run (pipelines.detection) until the CLI moves to
# pipelines/ (issue 15); nothing else under lorax/ may
CLI_PENDING_MOVE = {"lorax/detect/commands.py"}


def test_library_does_not_import_dvc_or_prefect() -> None:
    bad = []
    for f in (REPO / "lorax").rglob("*.py"):
        if f.relative_to(REPO).as_posix() in CLI_PENDING_MOVE:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{f.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("dvc", "prefect", "pipelines")]
    assert bad == []


def test_every_parses_durations() -> None:
    assert [parse_every(x) for x in ("90", "30s", "15m", "1h", "1d", "1.5h")] == [90, 30, 900, 3600, 86400, 5400]
    for bad in ("", "soon", "0s", "-1h", "1w"):
        with pytest.raises(ValueError, match="--every"):
            parse_every(bad)


def test_watch_deployment_runs_on_an_interval(tmp_path: Path) -> None:
    from pipelines.flows import watch_deployment

    dep = watch_deployment("params.yaml", str(tmp_path), parse_every("1h"))
    assert dep.name == "lorax-watch"
    assert dep.parameters == {"params_path": "params.yaml", "root": str(tmp_path.resolve())}
    assert [s.schedule.interval for s in dep.schedules] == [timedelta(hours=1)]
