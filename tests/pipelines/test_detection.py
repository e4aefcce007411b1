"""The detect stage (pipelines.detect_runs): its outputs, one MLflow run per detector (also `lorax detect --track`),
and its DVC file (a separate pipeline that plain `dvc repro` never runs)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cli import main
from tests.helpers import PARAMS_YAML, REPO, tiny_params
from tests.detect.synth import CLI_TINY_DETECT as CLI_TINY
from tests.detect.synth import TINY_DETECT as TINY
from tests.detect.synth import make_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("detection_zoo"), n_train=8, n_val=4, size=20)


def test_detect_step_logs_one_mlflow_run(zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient

    from pipelines.layout import Layout
    from pipelines.tracking.tracker import Tracker
    from pipelines.detect_runs import detect_step

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
    from tests.helpers import dvc, dvc_project

    root = dvc_project(tmp_path / "proj", ["deconv", "nnconv"])
    (root / "pipelines" / "detection").mkdir(parents=True)
    shutil.copy(REPO / "pipelines" / "detection" / "dvc.yaml", root / "pipelines" / "detection" / "dvc.yaml")
    default = dvc(root, "stage", "list", "--name-only").stdout.split()  # what plain `dvc repro` runs
    assert "report" in default and not any("detect" in s for s in default)
    assert "pipelines/detection/dvc.yaml:detect" in dvc(root, "stage", "list", "--all", "--name-only").stdout.split()
    dag = dvc(root, "dag", "--md", "pipelines/detection/dvc.yaml:detect").stdout
    upstream = set(re.findall(r'"([^"]+)"', dag))
    assert upstream == {"pipelines/detection/dvc.yaml:detect", "check", "synth@deconv", "prepare@deconv",
                        "synth@nnconv", "prepare@nnconv"}  # the stream's manifests and settings check, never training
    dag = dvc(root, "dag", "--md", "pipelines/detection/dvc.yaml:register").stdout
    assert "pipelines/detection/dvc.yaml:detect" in set(re.findall(r'"([^"]+)"', dag))  # registers what detect made
