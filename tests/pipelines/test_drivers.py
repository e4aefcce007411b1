"""The schedule is an interval deployment (the layering of lorax/ vs pipelines/: tests/test_layering.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from pipelines.cli.project import parse_every

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
