"""Which stages a flow records in dvc.lock: what it ran, and whatever the lock does not know yet."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.dvc_record import record_stages, stages_to_record


def test_only_what_ran_and_what_the_lock_lacks(tmp_path: Path) -> None:
    assert stages_to_record(tmp_path, ["a"], None) == [
        "check", "init", "synth@a", "prepare@a", "train@a", "select@a", "evaluate@a", "register@a", "report"]
    locked = {"check", "init", "report", *[f"{s}@a" for s in ("synth", "prepare", "train", "select", "evaluate",
                                                                "register")], "train@b"}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {s: {} for s in locked}}))
    got = stages_to_record(tmp_path, ["a", "b", "c"], ["c"])
    assert "train@a" not in got and "init" not in got and "train@b" not in got  # recorded, not run now
    assert {"synth@b", "register@b"} <= set(got)  # never recorded: committed now
    assert {f"{s}@c" for s in ("synth", "train", "register")} <= set(got) and {"check", "report"} <= set(got)
    (tmp_path / "dvc.lock").write_text(": not yaml [")
    assert len(stages_to_record(tmp_path, ["a"], [])) == 9  # an unreadable lock: everything


def test_a_folder_without_dvc_is_left_alone(tmp_path: Path) -> None:
    assert record_stages(tmp_path, ["a"]) is False
    assert not (tmp_path / "dvc.lock").exists()
