"""The detector as its own registered model: the Prefect flow `lorax-detect` for real (a temporary Prefect API, a
sqlite MLflow store, a tiny synthetic zoo) trains and registers it as champion; a second registration of the same
checkpoint is the same version; a detector below detect.register_min_ap is registered, the champion stays and the
record says why; the DVC stage's entry point runs the same step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorax.config import load_params
from tests.detect.synth import TINY_DETECT, make_zoo
from tests.helpers import tool_env, write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_project(tmp_path_factory.mktemp("detector_registry") / "project", ["deconv", "nnconv"],
                         **TINY_DETECT, detect__register_min_ap=0.0)
    make_zoo(root / "data", n_train=8, n_val=4, size=20)  # data/manifests: checker_a (training), checker_b, stripes
    return root


@pytest.mark.slow
def test_detect_flow_registers_a_champion_then_a_gate_failure_keeps_it(prefect_api, project: Path) -> None:
    from mlflow import MlflowClient

    from pipelines.detect_runs import register_detector_step
    from pipelines.flows import detect_flow
    from pipelines.layout import Layout
    from pipelines.tracking.detector_registry import ID_TAG, detector_champion, detector_id
    from pipelines.tracking.tracker import Tracker

    out = detect_flow("params.yaml", str(project))
    v1 = out["version"]
    assert v1["name"] == "lorax-detector" and v1["version"] == 1 and v1["gate"] == "passed"
    assert v1["aliases"] == ["champion"] and "register_min_ap=0" in v1["gate_reason"]
    rep = project / "reports" / "detect"
    metrics = json.loads((rep / "metrics.json").read_text())
    assert v1["seen_map"] == pytest.approx(metrics["seen"]["checker_a"]["ap"], abs=1e-3)
    assert json.loads((rep / "registry.json").read_text())["version"] == 1

    params = load_params(project / "params.yaml")
    tracker = Tracker(params, project)
    client = MlflowClient(tracker.uri)
    mv = client.get_model_version("lorax-detector", "1")
    assert mv.run_id == out["detect"]["mlflow_run_id"]  # the version lives in the detect run that trained it
    assert client.get_run(mv.run_id).data.tags[ID_TAG] == detector_id(rep / "detector.safetensors")
    import mlflow

    got = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/lorax-detector@champion",
                                                   dst_path=str(project.parent / "dl")))
    assert (got / "detector.safetensors").read_bytes() == (rep / "detector.safetensors").read_bytes()
    assert [m.name for m in client.search_registered_models()] == ["lorax-detector"]  # not the attributor's name

    layout = Layout.from_params(params, project)
    again = register_detector_step(params, layout, tracker)  # the same checkpoint: the same version
    assert again["registered_now"] is False and again["version"] == 1

    # a weaker detector, trained without tracking (another seed: another checkpoint), below the gate
    from lorax.detect.runner import run_detect

    weak = params.model_copy(update={"seed": 1}, deep=True)
    weak.detect.register_min_ap = 50.0
    run_detect(weak, layout.manifests, rep)
    m = json.loads((rep / "metrics.json").read_text())
    m["seen"]["checker_a"]["ap"] = 40.0  # what the gate reads: a detector that does not separate its own generator
    (rep / "metrics.json").write_text(json.dumps(m))
    v2 = register_detector_step(weak, layout, tracker)
    assert v2["version"] == 2 and v2["gate"] == "failed" and v2["aliases"] == []
    assert "40.00" in v2["gate_reason"] and "detect.register_min_ap=50" in v2["gate_reason"]
    assert v2["champion_before"] == 1 and detector_champion(tracker.client, "lorax-detector")["version"] == 1
    record = json.loads((rep / "registry.json").read_text())
    assert record["gate"] == "failed" and record["version"] == 2
    run = client.get_run(client.get_model_version("lorax-detector", "2").run_id)  # a run of its own
    assert run.info.run_id != mv.run_id and run.data.tags["lorax.kind"] == "detect"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/detector.safetensors"]

    # the DVC stage's entry point (pipelines/detection/dvc.yaml: register) runs the same step: idempotent here
    res = subprocess.run([sys.executable, "-m", "pipelines.register_detector", "--root", str(project)],
                         cwd=Path(__file__).resolve().parents[2], env=tool_env(LORAX_WARM="0"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads((rep / "registry.json").read_text())["version"] == 2
    assert len(client.search_model_versions("name='lorax-detector'")) == 2


def test_register_without_a_detector_names_the_step_to_run(project: Path, tmp_path: Path) -> None:
    from pipelines.detect_runs import register_detector_step
    from pipelines.layout import Layout

    params = load_params(project / "params.yaml")
    with pytest.raises(FileNotFoundError, match="run the detect step first"):
        register_detector_step(params, Layout.from_params(params, tmp_path), tracker=None)


def test_gate_reasons() -> None:
    from pipelines.tracking.detector_registry import detector_gate

    seen = {"seen": {"a": {"ap": 80.0}, "b": {"ap": 100.0}}}
    assert detector_gate(seen, 90.0).passed and not detector_gate(seen, 90.5).passed
    assert "a 80.00, b 100.00" in detector_gate(seen, 95).reason
    missing = detector_gate({"seen": {"a": {"ap": None}}}, 0.0)
    assert not missing.passed and "no AP" in missing.reason
