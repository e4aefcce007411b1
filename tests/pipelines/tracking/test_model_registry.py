"""MLflow tracking and the registry on a real sqlite store: runs, versions, the quality gate, the champion alias,
`lorax models list --json`, and a champion that loads from `models:/lorax-attributor@champion` alone."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipelines import publish, steps
from pipelines.layout import Layout
from pipelines.cli import main
from lorax.serving.schema import COLUMNS
from lorax.config import load_params
from pipelines.tracking import model_registry as registry
from pipelines.tracking.model_registry import GateResult
from tests.helpers import write_project

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Two tiny tasks trained through the pipeline steps, tracked in a sqlite store in the project."""
    from pipelines.tracking.tracker import Tracker

    root = write_project(tmp_path_factory.mktemp("registry"), ["deconv", "nnconv"], train__epochs=2)
    params = load_params(root / "params.yaml")
    layout = Layout.from_params(params, root)
    tracker = Tracker(params, root)
    steps.init_step(params, layout, tracker)
    for t in params.tasks:
        steps.synth_step(params, layout, t)
        steps.prepare_step(params, layout, t)
        steps.train_step(params, layout, t, tracker)
        steps.select_step(params, layout, t)
        steps.evaluate_step(params, layout, t)
    for t in params.tasks:  # registered here, so the tests below need no other test to have run first
        publish.register_step(params, layout, t, tracker)
    return root, params, layout, tracker


def _tracker_for(project, model: str):
    from pipelines.tracking.tracker import Tracker

    root, params, *_ = project
    p = params.model_copy(deep=True)
    p.tracking.registered_model = model
    return Tracker(p, root)


def test_runs_params_and_metrics(project) -> None:
    root, params, layout, tracker = project
    parent = json.loads(layout.stream_file.read_text())["parent_run_id"]
    c = tracker.client
    runs = c.search_runs([tracker.experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert set(children) == {"deconv", "nnconv"}
    run = children["nnconv"]
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.backbone"] == params.model.backbone
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert run.data.tags["env.torch"] and "env.mlflow" in run.data.tags
    info = json.loads((layout.state("nnconv") / "state.json").read_text())
    assert info["tracking"]["parent_run_id"] == parent and info["tracking"]["run_id"] == run.info.run_id


def test_versions_gate_and_champion(project) -> None:
    root, params, layout, _ = project
    tr = _tracker_for(project, "gate-test")
    run = json.loads((layout.state("nnconv") / "state.json").read_text())["tracking"]["run_id"]
    seen: list = []

    def reg(task, tasks, acc, sid, passed=True, parent=None):
        ev = {"task_acc": acc, "mean_acc": sum(acc) / len(acc), "binary_acc": 50.0}

        def judge(before):
            seen.append(before and before["version"])
            return GateResult(passed, "figures say so" if passed else "pooled accuracy on the union 60.0 is below")

        return registry.register(tr, task=task, tasks=tasks, state_dir=layout.state(task),
                                 memory_path=layout.memory(task), eval_result=ev, run_id=run, state_id=sid,
                                 judge=judge, parent=parent)

    v1 = reg("deconv", ["deconv"], [90.0], "a" * 64)
    assert v1["gate"] == "passed" and v1["aliases"] == ["champion"] and v1["parent"] is None
    v2 = reg("nnconv", ["deconv", "nnconv"], [70.0, 95.0], "b" * 64, passed=False, parent=1)
    assert v2["gate"] == "failed" and "union" in v2["gate_reason"] and v2["aliases"] == [] and v2["parent"] == 1
    v3 = reg("nnconv", ["deconv", "nnconv"], [89.0, 95.0], "c" * 64, parent=1)
    assert v3["gate"] == "passed" and v3["champion_before"] == 1
    assert seen == [None, 1, 1]  # the judge is handed the champion of the moment
    again = reg("nnconv", ["deconv", "nnconv"], [89.0, 95.0], "c" * 64)  # idempotent: same run and state
    assert again["version"] == v3["version"] and not again["registered_now"] and len(seen) == 3
    versions = registry.list_versions(tr.client, "gate-test")
    assert [(v["version"], v["gate"], v["aliases"]) for v in versions] == \
        [(1, "passed", []), (2, "failed", []), (3, "passed", ["champion"])]
    assert versions[2]["tasks"] == ["deconv", "nnconv"] and versions[2]["aaf"] == pytest.approx(92.0)
    assert tr.client.get_model_version("gate-test", "3").tags["scenario"] == params.tracking.scenario

    # by hand: promote the refused v2, then roll back to the champion it replaced; reasons on tags and cards
    import yaml

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["tracking"]["registered_model"] = "gate-test"
    (root / "params.gate.yaml").write_text(yaml.safe_dump(raw))
    cli = ["--root", str(root), "--params", "params.gate.yaml"]
    assert main(["models", "promote", "2", "--reason", "better on our own photos", *cli]) == 0
    champ = registry.champion(tr.client, "gate-test")
    assert champ["version"] == 2 and "better on our own photos" in champ["promoted"]
    assert champ["champion_before"] == 3
    assert "better on our own photos" in registry.list_versions(tr.client, "gate-test")[2]["demoted"]
    assert main(["models", "rollback", "--reason", "field reports", *cli]) == 0
    champ = registry.champion(tr.client, "gate-test")
    assert champ["version"] == 3 and "field reports" in champ["promoted"] and champ["promoted"].startswith("rollback")
    import mlflow

    card = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{champ['source']}/card/model_card.md",
                                                    dst_path=str(root / "card3"))).read_text()
    assert "field reports" in card
    assert main(["models", "promote", "9", "--reason", "x", *cli]) == 2  # no such version


def test_register_step_and_models_list_json(project, capsys, monkeypatch) -> None:
    root, params, layout, tracker = project
    for t in params.tasks:  # again: the same version (idempotent), its record unchanged
        rec = publish.register_step(params, layout, t, tracker)
        assert not rec["registered_now"]
        assert json.loads(layout.registry(t).read_text())["version"] == rec["version"]
    run = tracker.client.get_run(rec["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["lorax.model_version"] == str(rec["version"])
    # the evaluation column in the task's run, the per-task curves (acc.deconv after step 0 and 1) in the stream's
    ev = json.loads(layout.eval(params.tasks[-1]).read_text())
    assert run.data.metrics["mean_acc"] == pytest.approx(ev["mean_acc"])
    parent = json.loads(layout.stream_file.read_text())["parent_run_id"]
    assert sorted({m.step for m in tracker.client.get_metric_history(parent, "acc.deconv")}) == [0, 1]
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store (set globally by mlflow)
    assert main(["models", "list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in out] == [1, 2]
    for v in out:
        assert {"version", "aliases", "tasks", "aaf", "gate"} <= set(v)
    assert out[0]["tasks"] == ["deconv"] and out[1]["tasks"] == ["deconv", "nnconv"]
    assert out[0]["gate"] == "passed" and any("champion" in v["aliases"] for v in out)
    assert main(["models", "list"]) == 0
    assert "champion" in capsys.readouterr().out


def test_each_version_carries_its_model_card_and_openset_calibration(project, tmp_path: Path) -> None:
    import mlflow
    import yaml

    root, params, layout, tracker = project
    for t in params.tasks:
        rec = publish.register_step(params, layout, t, tracker)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=rec["source"], dst_path=str(tmp_path)))
    md = (local / "card" / "model_card.md").read_text()
    assert f"after task `{params.tasks[-1]}` ({len(params.tasks)} tasks)" in md
    assert "](acc_matrix.png)" in md and (local / "card" / "acc_matrix.png").stat().st_size > 1000
    assert (local / "card" / "confusion.png").is_file()
    arts = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
    assert "openset" in arts and (local / arts["openset"]["path"] / "openset.json").is_file()
    assert (layout.state(params.tasks[-1]).parent / f"{params.tasks[-1]}.openset" / "openset.json").is_file()


def test_champion_loads_from_the_registry_alone(project, tmp_path: Path, monkeypatch) -> None:
    import mlflow

    root, params, layout, tracker = project
    champ = registry.champion(tracker.client, params.tracking.registered_model)
    images = sorted((layout.data_root / champ["tasks"][-1] / "val" / "1_fake").glob("*.png"))[:2]
    # the project's own state and memory folders are not needed: move them away while loading
    shutil.move(root / "state", tmp_path / "state")
    shutil.move(root / "memory", tmp_path / "memory")
    # paths are read only under a folder the operator allows
    monkeypatch.setenv("LORAX_SERVE_IMAGE_ROOT", str(layout.data_root))
    try:
        model = mlflow.pyfunc.load_model(f"models:/{params.tracking.registered_model}@champion")
        out = model.predict(pd.DataFrame({"image": [base64.b64encode(images[0].read_bytes()).decode(),
                                                     str(images[1])]}))
    finally:
        shutil.move(tmp_path / "state", root / "state")
        shutil.move(tmp_path / "memory", root / "memory")
    classes = [f"{t}/{k}" for t in champ["tasks"] for k in ("real", "fake")]
    assert list(out.columns) == COLUMNS  # no per-class columns: they would change with every version
    assert all(e is None or e["class"] in classes for top in out["top"] for e in top)
    assert {g for g in out["generator"] if g is not None} <= set(champ["tasks"])
    bad = model.predict(pd.DataFrame({"image": ["not an image and not a file"]}))  # an error row, not a failure
    assert list(bad["status"]) == ["error"] and "no such file" in bad["error"][0]
