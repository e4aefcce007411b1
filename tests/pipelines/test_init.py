"""`lorax init`: a params.yaml for the user's own folder, written from a profile with its comments, checked as
`prepare` reads the folder; then `lorax stream add` and `dvc repro` take it as is."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from lorax.config import ConfigError, load_params
from lorax.data.images import DataError
from pipelines.cli import main
from pipelines.init_params import init_params
from pipelines.stream_edit import append_to_stream
from tests.helpers import REPO, TINY_OVERRIDES, dvc, dvc_project, noise_images, stages_ran, write_cddb


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A tiny CDDB folder beside the project (tmp_path/proj): tasks b, a, c."""
    return write_cddb(tmp_path / "mine", ["b", "a", "c"], n=1)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "proj").mkdir()
    return tmp_path / "proj"


def test_realworld_profile_with_tasks_in_the_given_order(project: Path, folder: Path) -> None:
    res = init_params(project / "params.yaml", "../mine", ["c", "a"], "realworld")
    p = load_params(project / "params.yaml")
    assert p.tasks == ["c", "a"] and p.stream["a"].prev == "c" and p.stream["c"].prev == "init"
    assert (p.data.source, p.data.root, p.data.manifests) == ("folder", "../mine", "data/manifests_mine")
    assert (p.tracking.scenario, p.detect.train_tasks) == ("mine-2", ["c"])
    assert p.model.img_size == load_params(REPO / "params.realworld.yaml").model.img_size  # the profile's
    text = (project / "params.yaml").read_text()
    assert "# realworld: blocks 4 and 8 join the last block" in text  # the profile's comments are kept
    assert "# The continual stream: task -> its predecessor" in text
    assert "issue 14's protocol" not in text  # ... but not its note on its own stream
    assert text.startswith("# lorax init: written by `lorax init` from params.realworld.yaml")
    assert any("smaller than crop 112" in n for n in res.notes)  # 40 px images: said now, not at prepare


def test_every_task_folder_by_name_and_an_absolute_root_outside(tmp_path: Path, folder: Path) -> None:
    project = tmp_path / "deep" / "er" / "proj"
    project.mkdir(parents=True)
    init_params(project / "params.yaml", folder, None, "zoo")
    p = load_params(project / "params.yaml")
    assert p.tasks == ["a", "b", "c"] and p.data.root == str(folder.resolve())
    assert p.model.img_size == load_params(REPO / "params.yaml").model.img_size
    assert "# builtin (the zoo, synthesised) | folder" in (project / "params.yaml").read_text()


def test_a_missing_task_or_class_folder_is_named(project: Path, folder: Path) -> None:
    with pytest.raises(DataError, match=r"task folders \['x'\] not found; tasks in .*\['a', 'b', 'c'\]"):
        init_params(project / "params.yaml", "../mine", ["a", "x"])
    shutil.rmtree(folder / "b" / "val" / "1_fake")
    with pytest.raises(DataError, match=r"mine/b/val: no 1_fake/ folder"):
        init_params(project / "params.yaml", "../mine")
    with pytest.raises(ConfigError, match="no such folder"):
        init_params(project / "params.yaml", "../nowhere")
    assert not (project / "params.yaml").exists()


def test_a_run_stream_is_replaced_only_with_force_and_a_backup(project: Path, folder: Path, capsys) -> None:
    params = project / "params.yaml"
    init_params(params, "../mine", ["a"])
    init_params(params, "../mine", ["b"])  # nothing ran yet: replaced
    (project / "dvc.lock").write_text("{}\n")
    before = params.read_text()
    assert main(["init", "--root", "../mine", "--tasks", "c", "--params", str(params)]) == 2
    assert "already run here" in capsys.readouterr().err and params.read_text() == before
    assert main(["init", "--root", "../mine", "--tasks", "c", "--params", str(params), "--force"]) == 0
    out = capsys.readouterr().out
    assert "params.yaml.bak" in out and "dvc repro" in out and "lorax stream add NAME" in out
    assert (project / "params.yaml.bak").read_text() == before
    assert load_params(params).tasks == ["c"]


def test_stream_add_appends_a_new_folder_after_init(project: Path, folder: Path) -> None:
    params = project / "params.yaml"
    init_params(params, "../mine", ["b", "a"])
    with pytest.raises(ConfigError, match="no such task folder under data.root"):
        append_to_stream(params, "d", root=project)
    assert append_to_stream(params, "c", root=project) == "c"
    p = load_params(params)
    assert p.tasks == ["b", "a", "c"] and p.stream["c"].prev == "a" and p.tracking.scenario == "mine-2"


def test_zoo_profile_refuses_a_params_yaml_from_another_profile(project: Path, folder: Path) -> None:
    shutil.copy(REPO / "params.realworld.yaml", project / "params.yaml")
    # the project's params.yaml is not the built-in settings: the shipped one is used instead
    init_params(project / "params.yaml", "../mine", ["a"], "zoo")
    assert load_params(project / "params.yaml").model.img_size == load_params(REPO / "params.yaml").model.img_size


@pytest.mark.slow
def test_dvc_repro_prepares_a_task_of_the_written_params(tmp_path: Path) -> None:
    """In a clone without .dvc/, `lorax init` runs `dvc init`; `dvc repro prepare@<first task>` then runs as is."""
    root = dvc_project(tmp_path / "proj", ["deconv"])
    shutil.rmtree(root / ".dvc")
    write_cddb(tmp_path / "mine", ["b", "a"], n=2, image=noise_images(np.random.default_rng(0), (112, 112)))
    assert main(["init", "--root", "../mine", "--tasks", "b,a", "--params", str(root / "params.yaml")]) == 0
    assert (root / ".dvc").is_dir()
    out = dvc(root, "repro", "prepare@b", LORAX_WARM="0")
    assert stages_ran(out.stdout) == ["check", "synth@b", "prepare@b"]
    assert (root / "data" / "manifests_mine" / "b.parquet").is_file()


def test_init_tune_writes_the_settings_chosen_on_the_train_split(tmp_path: Path, monkeypatch, capsys) -> None:
    """`lorax init --tune`: the written params get tune.grid's winner on the folder's train folds (the tiny model
    and grid through -S, which shape the tuning runs only); the manifests stay in the tune's own folder."""
    write_cddb(tmp_path / "mine", ["b", "a"], n=6)
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.chdir(project)
    tiny = {k: v for k, v in TINY_OVERRIDES.items() if not k.startswith(("zoo.", "stream"))}
    sets = [f"{k}={json.dumps(v)}" for k, v in tiny.items()]
    sets += ["tune.folds=2", "tune.grid={model.img_size: [12, 16]}", f"cache.dir={tmp_path / 'cache'}"]
    argv = ["init", "--root", "../mine", "--profile", "zoo", "--tune", "--no-track"]
    assert main([*argv, *[x for s in sets for x in ("-S", s)]]) == 0
    doc = json.loads((project / "params.tune.json").read_text())
    assert doc["tasks"] == ["a", "b"] and doc["folds"] == 2 and len(doc["runs"]) == 4  # 2 settings x 2 folds
    p = load_params(project / "params.yaml")
    assert p.model.img_size == doc["chosen"]["model.img_size"] in (12, 16)  # the zoo profile's own is 28
    assert p.model.backbone == load_params(REPO / "params.yaml").model.backbone  # -S stayed in the tuning runs
    text = (project / "params.yaml").read_text()
    assert text.startswith("# lorax init: written by `lorax init --root ../mine --profile zoo --tune` from params.yaml")
    assert "# builtin (the zoo, synthesised)" in text  # the profile's comments kept
    assert sorted(f.name for f in (project / "params.tune" / "manifests").glob("*.parquet")) == ["a.parquet",
                                                                                                 "b.parquet"]
    assert not (project / p.data.manifests).exists()  # the pipeline's prepare stage still owns those
    assert "chosen: {'model.img_size'" in capsys.readouterr().out


def test_init_settings_without_tune_or_outside_the_project_are_refused(tmp_path: Path, folder: Path,
                                                                      monkeypatch, capsys) -> None:
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["init", "--root", "../mine", "-S", "train.epochs=1"]) == 2
    assert "give --tune too" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--root", "mine", "--params", "proj/params.yaml", "--tune"]) == 2
    assert re.search(r"--tune runs from the project root: cd \S*proj", capsys.readouterr().err)
    assert not (tmp_path / "proj" / "params.yaml").exists()  # refused before anything was written
