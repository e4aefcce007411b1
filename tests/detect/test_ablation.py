"""The ablation command (grid, runs, tables, resume), detector runs in MLflow, the detect pipeline stage and its
DVC file (a separate pipeline that plain `dvc repro` never runs)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cli import main
from lorax.detect.ablation import Variant, ablation_grid, parse_blocks, parse_rank_set, run_ablation
from lorax.detect.runner import detect_params
from tests.conftest import PARAMS_YAML, REPO, tiny_cli_sets, tiny_params
from tests.detect.synth import make_zoo

TINY = {"detect__train_tasks": ["checker_a"], "detect__blocks": 1, "detect__epochs": 1, "detect__batch_size": 16,
        "detect__blur_sigmas": [2], "detect__jpeg_qualities": [50]}
CLI_TINY = ["-S", "detect.blocks=1", "-S", "detect.epochs=1", "-S", "detect.batch_size=16", *tiny_cli_sets()]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("ablation_zoo"), n_train=8, n_val=4, size=20)


@pytest.fixture(scope="module")
def extra(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gens = {"far": ("stripes", 30.0, 1)}
    return make_zoo(tmp_path_factory.mktemp("ablation_extra"), n_train=2, n_val=3, size=20, seed=5, generators=gens)


def test_grid_follows_the_paper_tables_one_factor_at_a_time():
    params = tiny_params(None, **TINY)
    tables = ablation_grid(params)
    assert list(tables) == ["design", "blocks", "ranks"]
    ref = Variant("mole", "mlp", 1, 8, (4, 8, 16))
    design = tables["design"]
    assert [v.method for v in design[:4]] == ["probe", "shared", "separate", "mole"] and design[3] == ref
    assert {(v.method, v.where) for v in design[4:]} == {("shared", "attn"), ("shared", "both"), ("mole", "attn"),
                                                         ("mole", "both")}
    assert [v.blocks for v in tables["blocks"]] == [1, 2, 3, 4, 5, 0]
    assert ref in tables["blocks"] and ref in tables["ranks"]
    assert (16, (4, 8, 16)) in {(v.shared_rank, v.expert_ranks) for v in tables["ranks"]}
    # methods ignore what they do not use: one probe, a shared LoRA has no experts, separate has no shared rank
    assert Variant("probe", "attn", 5) == Variant("probe") and Variant("probe").slug == "probe"
    assert Variant("shared").expert_ranks == () and Variant("separate").shared_rank == 0
    assert Variant("mole", blocks=0).slug == "mole-mlp-ball-r8_4.8.16"
    small = ablation_grid(params, groups=["design"], methods=["mole", "probe", "mole"], where=["mlp"])
    assert small == {"design": [ref, Variant("probe")]}


@pytest.mark.parametrize("call, match", [
    (lambda p: parse_blocks("0"), ">= 1"),
    (lambda p: parse_blocks("last"), "'all'"),
    (lambda p: parse_rank_set("8-4/8"), "SHARED:E1"),
    (lambda p: parse_rank_set("0:4/8"), "shared rank >= 1"),
    (lambda p: ablation_grid(p, groups=["design", "heads"]), "unknown"),
    (lambda p: ablation_grid(p, methods=["moe"]), "unknown detector"),
    (lambda p: ablation_grid(p, groups=["blocks"], blocks=[]), "no variants"),
])
def test_bad_grid_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_params(None, **TINY))


def test_run_writes_tables_and_resumes(zoo: Path, extra: Path, tmp_path: Path):
    params = tiny_params(None, **TINY)
    tables = ablation_grid(params, groups=["design", "ranks"], methods=["probe", "mole"], where=["mlp"],
                           ranks=["8:4/8/16"])  # the reference row is in both tables: trained once
    out = tmp_path / "abl"
    s = run_ablation(params, zoo, out, tables, seeds=[0, 1], extra_eval={"far": extra}, command="the command")
    assert s["complete"] and set(s["rows"]) == {"probe", "mole-mlp-b1-r8_4.8.16"}
    row = s["rows"]["mole-mlp-b1-r8_4.8.16"]
    assert row["map"]["n"] == 2 and 0 <= row["map"]["mean"] <= 100 and row["map"]["std"] >= 0
    assert set(row["ap"]) == {"checker_b", "stripes"} and row["extra"]["far"]["map"]["n"] == 2
    assert s["rows"]["probe"]["trainable_params"] < row["trainable_params"]
    runs = sorted(p.parent.name + "/" + p.name for p in (out / "runs").glob("*/seed*"))
    assert len(runs) == 4 and all((out / "runs" / r / "metrics.json").is_file() for r in runs)
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["tables"] == {"design": ["probe", "mole-mlp-b1-r8_4.8.16"], "ranks": ["mole-mlp-b1-r8_4.8.16"]}
    assert json.loads((out / "runs" / "probe" / "seed0" / "metrics.json").read_text())["robustness"] == \
        {"blur": {}, "jpeg": {}}  # robustness off by default
    md = (out / "ablation.md").read_text()
    assert "## Adapter design" in md and "## LoRA ranks" in md and "`the command`" in md
    assert "| linear probe |" in md and "| 8 : 4/8/16 |" in md and "mAP far" in md and "± " in md
    assert "Ordering by unseen mAP" in md and "Chance level" in md
    assert saved["chance_map"]["unseen"] == pytest.approx(50.0)  # the synthetic zoo is balanced
    assert saved["chance_map"]["far"] == pytest.approx(50.0)

    # a second run reuses every finished run; a changed setting re-runs
    stamp = {r: (out / "runs" / r / "metrics.json").stat().st_mtime_ns for r in runs}
    again = run_ablation(params, zoo, out, tables, seeds=[0, 1], extra_eval={"far": extra})
    assert again["rows"]["probe"]["map"] == s["rows"]["probe"]["map"]
    assert all((out / "runs" / r / "metrics.json").stat().st_mtime_ns == t for r, t in stamp.items())
    other = run_ablation(params, zoo, tmp_path / "other", {"design": [Variant("probe")]}, seeds=[1],
                         extra_eval={"far": extra}, runs_dir=out / "runs")  # sharing the runs folder
    assert other["rows"]["probe"]["map"]["mean"] == json.loads(
        (out / "runs" / "probe" / "seed1" / "metrics.json").read_text())["map"]
    assert all((out / "runs" / r / "metrics.json").stat().st_mtime_ns == t for r, t in stamp.items())
    assert not (tmp_path / "other" / "runs").exists()
    lr = tiny_params(None, **{**TINY, "detect__lr": 1e-3})
    run_ablation(lr, zoo, out, {"design": [Variant("probe")]}, seeds=[0])
    assert (out / "runs" / "probe" / "seed0" / "metrics.json").stat().st_mtime_ns != stamp["probe/seed0"]


def test_cli(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "cli"
    argv = ["detect-ablation", "--manifests", str(zoo), "--out", str(out), "--train-tasks", "checker_a",
            "--groups", "design", "--methods", "probe", "--where", "mlp", "--params", str(PARAMS_YAML), *CLI_TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| linear probe |" in printed
    command = json.loads((out / "ablation.json").read_text())["command"]
    assert command.startswith("python -m lorax.detect.ablation --manifests") and "--methods probe" in command
    assert "--where-methods" not in command  # defaults are left out
    assert main([*argv, "--seeds", "a,b"]) == 2
    assert main([*argv, "--groups", "ranks", "--ranks", "8"]) == 2
    assert main([*argv, "--train-tasks", "nope"]) == 2


def test_detect_model_is_the_detectors_own_backbone():
    p = tiny_params(None, detect__model={"backbone": "vit_tiny_patch16_224", "pretrained": None, "img_size": 16,
                                      "kwargs": {}})
    assert detect_params(p).model.backbone == "vit_tiny_patch16_224" and p.model.backbone == "convit_tiny"
    assert detect_params(tiny_params()).model == tiny_params().model  # null: the model section


def test_detect_step_logs_one_mlflow_run(zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient

    from lorax.detect.tracking import detect_step
    from pipelines.layout import Layout
    from pipelines.tracking.tracker import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    shutil.copytree(zoo, root / "data" / "manifests")
    params = tiny_params(None, **TINY, data__manifests="data/manifests", tracking__uri=None)
    tracker = Tracker(params, root)
    metrics = detect_step(params, Layout.from_params(params, root), tracker)
    rep = root / "reports" / "detect"
    for f in ("metrics.json", "robustness.png", "robustness.csv", "per_generator.csv", "detector.safetensors",
              "scores.parquet"):
        assert (rep / f).is_file(), f
    rob = pd.read_csv(rep / "robustness.csv")
    assert list(rob["perturbation"]) == ["none", "blur", "jpeg"] and list(rob["level"]) == [0, 2, 50]

    client = MlflowClient(tracker.uri)
    exp = client.get_experiment_by_name("lorax-zoo-5-detect")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == metrics["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["lorax.kind"] == "detect" and run.data.tags["lorax.train_tasks"] == "checker_a"
    assert run.data.params["detect.method"] == "mole" and run.data.params["detect.epochs"] == "1"
    assert run.data.metrics["map"] == pytest.approx(metrics["map"])
    assert run.data.metrics["ap.stripes"] == pytest.approx(metrics["per_generator"]["stripes"]["ap"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "robust_jpeg_map")] == [50]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "plots", "checkpoint", "tables"} <= arts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/detector.safetensors"]

    # `lorax detect --track` logs one more run to the same store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    argv = ["detect", "--method", "probe", "--train-tasks", "checker_a", "--manifests", str(zoo), "--out",
            str(tmp_path / "cli"), "--params", str(PARAMS_YAML), "--track", *CLI_TINY]
    assert main(argv) == 0
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["lorax.method"] for r in runs) == ["mole", "probe"]


def test_detection_dvc_file_is_a_separate_pipeline(tmp_path: Path):
    """`dvc repro` of the stream never runs detect; the detect pipeline's upstream is the stream's prepare stages."""
    from tests.pipelines.conftest import dvc, dvc_project

    root = dvc_project(tmp_path / "proj", ["deconv", "nnconv"])
    (root / "pipelines" / "detection").mkdir(parents=True)
    shutil.copy(REPO / "pipelines" / "detection" / "dvc.yaml", root / "pipelines" / "detection" / "dvc.yaml")
    default = dvc(root, "stage", "list", "--name-only").stdout.split()  # what plain `dvc repro` runs
    assert "report" in default and not any("detect" in s for s in default)
    assert "pipelines/detection/dvc.yaml:detect" in dvc(root, "stage", "list", "--all", "--name-only").stdout.split()
    dag = dvc(root, "dag", "--md", "pipelines/detection/dvc.yaml:detect").stdout
    upstream = set(re.findall(r'"([^"]+)"', dag))
    assert upstream == {"pipelines/detection/dvc.yaml:detect", "synth@deconv", "prepare@deconv", "synth@nnconv",
                        "prepare@nnconv"}  # built on the stream's manifests, never on its training
