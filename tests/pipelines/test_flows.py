"""The Prefect flows for real (a temporary Prefect API, a sqlite MLflow store, a tiny stream in a DVC project): the
whole stream, a re-run that redoes nothing, the watch flow learning new folders on top of the whole chain (one
lineage with DVC: params.yaml's stream grows, dvc.lock records the flows' stages), bad images quarantined, and two
watch runs at once that never train the same generator twice."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lorax.config import load_params
from lorax.continual.summary import read_metrics
from lorax.data import zoo
from pipelines.summary_table import format_result
from tests.helpers import dvc, dvc_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A folder project (data.source: folder) whose first two task folders are zoo generators' images."""
    root = dvc_project(tmp_path_factory.mktemp("flows") / "project", ["deconv", "nnconv"],
                       data__bad_file_limit=0.1, data__source="folder")
    params = load_params(root / "params.yaml")
    for t in params.tasks:
        zoo.synth_task(t, root / params.data.root, params.zoo)
    return root


def _versions(root: Path) -> list[dict]:
    from pipelines.tracking.model_registry import list_versions
    from pipelines.tracking.tracker import Tracker

    params = load_params(root / "params.yaml")
    return list_versions(Tracker(params, root).client, params.tracking.registered_model)


def test_the_flows_from_a_first_run_to_an_inbox_scan(prefect_api, project: Path) -> None:
    """The steps share one project and each builds on the previous one's champion, so they run as one test, in
    order (the runner may shuffle tests): the continual flow and its re-run; two watch runs; the new-generator flow
    on a known task; the watch flow's inbox scan."""
    _continual_flow_then_a_rerun_redoes_nothing(project)
    _two_watch_runs_learn_each_new_folder_once(project)
    _new_generator_flow_skips_a_task_the_champion_knows(project)
    _watch_flow_scans_an_inbox_with_the_champion(project)


def _continual_flow_then_a_rerun_redoes_nothing(project: Path) -> None:
    from pipelines.flows import continual_flow

    out = continual_flow("params.yaml", str(project))
    assert [v["tasks"] for v in out["versions"]] == [["deconv"], ["deconv", "nnconv"]]
    metrics = read_metrics(out["metrics"])
    assert metrics["tasks"] == ["deconv", "nnconv"] and len(metrics["acc_matrix"]) == 2
    printed = format_result(out)  # what `python -m pipelines.flows continual` prints
    assert [line.split()[:2] for line in printed.splitlines()[2:4]] == [["1", "deconv"], ["2", "nnconv"]]
    assert "aaf" in printed and "accuracy matrix" in printed and "{" not in printed
    stamps = {p: p.stat().st_mtime_ns for p in (project / "state").rglob("*") if p.is_file()}
    stamps.update({p: p.stat().st_mtime_ns for p in (project / "memory").glob("*")})
    again = continual_flow("params.yaml", str(project))
    assert [v["version"] for v in again["versions"]] == [v["version"] for v in out["versions"]]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no step was redone
    assert len(_versions(project)) == 2


def _add_folder(project: Path, generator: str, name: str, bad: bool) -> None:
    """A new task folder made by a zoo generator that is not in the stream (distinct pixels: no leakage)."""
    params = load_params(project / "params.yaml")
    tmp = project.parent / "incoming"
    zoo.synth_task(generator, tmp, params.zoo)
    dest = project / "data" / "zoo" / name
    shutil.copytree(tmp / generator, dest)
    if bad:
        fake = sorted((dest / "train" / "1_fake").glob("*.png"))
        fake[0].write_bytes(fake[0].read_bytes()[:40])  # cut inside its header
        (dest / "train" / "0_real" / "notes.png").write_text("not an image")
        Image.new("RGB", (4, 4)).save(dest / "train" / "0_real" / "tiny.png")  # smaller than the crop


def _two_watch_runs_learn_each_new_folder_once(project: Path) -> None:
    from pipelines.flows import watch_flow

    _add_folder(project, "bilinconv", "newgan_a", bad=False)
    _add_folder(project, "pixshuf", "newgan_b", bad=True)
    # what the continual flow made: the watch flow builds on it and changes none of it
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for d in ("state", "memory", "reports/eval")
              for p in (project / d).rglob("*") if p.is_file()}
    assert before
    results: list = [None, None]
    errors: list = []

    def run(k: int) -> None:
        try:
            results[k] = watch_flow("params.yaml", str(project))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    trained = [r["task"] for res in results for r in res["trained"]]
    assert sorted(trained) == ["newgan_a", "newgan_b"]  # each once, over both runs
    assert any(res["trained"] for res in results)
    # one lineage: each new folder was appended to params.yaml's stream and learned on top of every task before it
    assert load_params(project / "params.yaml").tasks == ["deconv", "nnconv", "newgan_a", "newgan_b"]
    chain = {v["tasks"][-1]: v for v in _versions(project)}
    assert [len(v["tasks"]) for v in _versions(project)] == [1, 2, 3, 4]
    assert chain["newgan_b"]["tasks"] == ["deconv", "nnconv", "newgan_a", "newgan_b"]
    assert chain["newgan_b"]["parent"] == chain["newgan_a"]["version"]
    assert chain["newgan_a"]["parent"] == chain["nnconv"]["version"]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before  # (DVC re-links, same bytes)
    assert (project / "state" / "newgan_b" / "state.json").is_file()
    # DVC knows what the flows made: nothing is stale, so `dvc repro` would redo none of it
    status = dvc(project, "status").stdout
    assert "up to date" in status, status
    # the bad files went through preparation's quarantine
    q = pd.read_csv(project / "data" / "manifests" / "newgan_b.quarantine.csv")
    reasons = {Path(f).name: r for f, r in zip(q["file"], q["reason"], strict=True)}
    assert set(reasons) == {"pixshuf_train_fake_00000.png", "notes.png", "tiny.png"}
    assert reasons["tiny.png"].startswith("smaller than crop") and reasons["notes.png"].startswith("not an image")
    res_b = next(r for res in results for r in res["trained"] if r["task"] == "newgan_b")
    assert res_b["quarantined"] == 3

    # a third run finds nothing new
    assert watch_flow("params.yaml", str(project))["trained"] == []


def _new_generator_flow_skips_a_task_the_champion_knows(project: Path) -> None:
    from pipelines.flows import new_generator_flow

    out = new_generator_flow("deconv", "params.yaml", str(project))
    assert out["skipped"] == "already in the stream" and out["version"] == 1


def _watch_flow_scans_an_inbox_with_the_champion(project: Path) -> None:
    """watch_flow(inbox=...) reports candidate new generators: the champion's ``lorax scan`` of the inbox."""
    from pipelines.flows import watch_flow

    params = load_params(project / "params.yaml")
    inbox = project.parent / "inbox"
    zoo.synth_task("deconv3", project.parent / "unseen", params.zoo)  # a generator no version knows
    inbox.mkdir()
    for k, src in enumerate(sorted((project.parent / "unseen" / "deconv3" / "val" / "1_fake").glob("*.png"))[:6]):
        shutil.copy(src, inbox / f"u{k}.png")
    for k, src in enumerate(sorted((project / "data" / "zoo" / "deconv" / "val" / "1_fake").glob("*.png"))[:4]):
        shutil.copy(src, inbox / f"k{k}.png")
    (inbox / "broken.png").write_text("not an image")
    out = watch_flow("params.yaml", str(project), inbox=str(inbox))
    scan = out["scan"]
    assert out["trained"] == [] and scan["n_images"] == 11 and scan["n_errors"] == 1 and scan["n_ok"] == 10
    folder = Path(scan["out"])
    assert folder.parent == project.resolve() / "reports" / "scan"
    assert json.loads((folder / "scan.json").read_text())["n_flagged"] == scan["n_flagged"]
    assert len(pd.read_csv(folder / "predictions.csv")) == 11
    grouped = sum(c["n_images"] for c in scan["candidates"]) + len(scan["ungrouped"])
    assert grouped == scan["n_flagged"]  # every flagged image is in a candidate group or listed as ungrouped
    for c in scan["candidates"]:
        assert len(list((folder / c["name"] / "train" / "1_fake").glob("*.png"))) == c["n_images"]
