"""`lorax stream add`: appends to params.yaml's stream as text (comments kept) and validates the result."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.cli import main
from lorax.config import ConfigError, load_params
from lorax.data.images import DataError
from pipelines.stream_edit import append_to_stream
from tests.helpers import REPO, write_cddb


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    return p


def test_next_appends_the_next_zoo_generator_and_keeps_comments(params_file: Path) -> None:
    before = params_file.read_text()
    tasks = load_params(params_file).tasks
    order = load_params(params_file).zoo.order
    expected = next(g for g in order if g not in tasks)
    assert append_to_stream(params_file, None) == expected
    after = params_file.read_text()
    p = load_params(params_file)
    assert p.tasks == tasks + [expected]
    assert p.stream[expected].prev == tasks[-1]
    # every original line is still there, in order; exactly one line was added
    assert [ln for ln in after.splitlines() if ln != f"  {expected}: {{prev: {tasks[-1]}}}"] == before.splitlines()
    assert "# The continual stream" in after


def test_cli_add_by_name_then_duplicate_is_refused(params_file: Path, capsys) -> None:
    p0 = load_params(params_file)
    name = [g for g in p0.zoo.order if g not in p0.tasks][1]  # not the next one: any zoo generator is allowed
    assert main(["stream", "add", name, "--params", str(params_file)]) == 0
    assert load_params(params_file).tasks[-1] == name
    text = params_file.read_text()
    assert main(["stream", "add", name, "--params", str(params_file)]) == 2
    assert "already in the stream" in capsys.readouterr().err
    assert params_file.read_text() == text


def test_builtin_source_refuses_a_non_zoo_name(params_file: Path) -> None:
    text = params_file.read_text()
    with pytest.raises(ConfigError, match="not a zoo generator.*data.source: folder"):
        append_to_stream(params_file, "mygan")
    assert params_file.read_text() == text


def test_folder_source_needs_the_folder(tmp_path: Path, params_file: Path) -> None:
    params_file.write_text(params_file.read_text().replace("source: builtin", "source: folder")
                           .replace("root: data/zoo", f"root: {tmp_path / 'ds'}"))
    with pytest.raises(ConfigError, match="no such task folder"):
        append_to_stream(params_file, "mygan", root=tmp_path)
    write_cddb(tmp_path / "ds", ["mygan"], n=1)
    shutil.rmtree(tmp_path / "ds" / "mygan" / "val")
    with pytest.raises(DataError, match="mygan/val: split folder missing"):  # checked as `prepare` will read it
        append_to_stream(params_file, "mygan", root=tmp_path)
    write_cddb(tmp_path / "ds", ["mygan"], n=1)
    assert append_to_stream(params_file, "mygan", root=tmp_path) == "mygan"
    assert load_params(params_file).tasks[-1] == "mygan"


def test_next_when_the_zoo_is_exhausted(params_file: Path) -> None:
    p = load_params(params_file)
    for _ in range(len(p.zoo.order) - len(p.tasks)):
        append_to_stream(params_file, None)
    with pytest.raises(ConfigError, match="already in the stream"):
        append_to_stream(params_file, None)
