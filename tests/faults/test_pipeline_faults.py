"""Faults of the DVC pipeline, each reproduced on a real project (real `dvc repro`, real MLflow sqlite store):
a bad setting and its fix, a copied project, `kill -9` of `dvc repro` mid-training.

The tests share one project and run in file order (each builds on the previous one's state)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.stream_edit import append_to_stream
from tests.helpers import BIN, REPO, dvc, dvc_project, repro_until, stages_ran, tool_env

pytestmark = pytest.mark.slow


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path``: its content hash (DVC's and git's folders too: nothing may change anywhere)."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and not f.is_symlink()}


def parent_run(root: Path) -> str:
    return json.loads((root / "state" / "init" / "stream.json").read_text())["parent_run_id"]


def outputs(root: Path) -> dict[str, str]:
    return {k: v for k, v in tree(root).items() if k.split("/")[0] in ("state", "memory", "reports", "data")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = dvc_project(tmp_path_factory.mktemp("faults") / "project", ["deconv"], train__epochs=3)
    res = dvc(root, "repro")
    assert stages_ran(res.stdout)[:2] == ["check", "init"]
    return root


def stage_errors(res: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("stage ")]


def test_a_bad_setting_stops_repro_before_any_output_is_removed_and_its_fix_retrains_nothing(repo: Path) -> None:
    params = repo / "params.yaml"
    good = params.read_text()
    before, parent = outputs(repo), parent_run(repo)
    for bad, names in ((good.replace("\n  epochs: 3\n", "\n  epochs: three\n"), "train.epochs"),
                       (good + "trian: {epochs: 3}\n", "trian: unknown key")):  # a value; a top-level typo
        params.write_text(bad)
        res = dvc(repo, "repro", check=False)
        assert res.returncode != 0 and stages_ran(res.stdout) == ["check"]
        errors = stage_errors(res)
        assert len(errors) == 1 and names in errors[0] and errors[0].startswith("stage check: error:"), res.stderr
        assert "Traceback" not in res.stderr
        assert {k: v for k, v in outputs(repo).items() if k != "reports/params.checked.json"} == \
            {k: v for k, v in before.items() if k != "reports/params.checked.json"}, "an output was removed"
    params.write_text(good)
    res = dvc(repo, "repro")
    assert stages_ran(res.stdout) == []  # the check's record comes back from DVC's run cache; nothing retrains
    assert outputs(repo) == before and parent_run(repo) == parent
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


def test_init_outputs_come_back_from_the_cache_with_the_same_parent_run(repo: Path) -> None:
    """What a failed init used to cost: its three outputs gone. They are all in DVC's cache, so nothing downstream
    is stale and the stream's MLflow parent run is the same one."""
    before, parent = outputs(repo), parent_run(repo)
    for p in ("state/init/stream.json", "memory/init.parquet", "reports/registry/init.json"):
        (repo / p).unlink()
    res = dvc(repo, "repro")
    assert stages_ran(res.stdout) == [] and "Stage 'init' is cached" in res.stdout
    assert outputs(repo) == before and parent_run(repo) == parent


def test_a_copied_project_reads_its_own_files_and_never_writes_into_the_original(repo: Path, tmp_path: Path) -> None:
    import pandas as pd
    from PIL import Image

    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(repo), str(copy)], check=True)
    original = tree(repo)
    # manifests and memories name no folder: the copy's rows are the copy's images
    raw = pd.read_parquet(copy / "data" / "manifests" / "deconv.parquet")
    assert set(raw["root"]) == {"."}
    assert set(pd.read_parquet(copy / "memory" / "deconv.parquet")["root"]) == {"."}

    image = copy / "data" / "zoo" / "deconv" / "train" / "0_real" / "deconv_train_real_00000.png"
    img = Image.open(image).convert("RGB")
    img.putpixel((0, 0), tuple(255 - c for c in img.getpixel((0, 0))))
    img.save(image)
    # the copy's next run sees it: DVC (prepare@deconv is stale), and the copy's loader (the old manifest's hash)
    assert "prepare@deconv" in json.loads(dvc(copy, "status", "--json").stdout)
    res = subprocess.run([str(BIN / "lorax"), "train", "--out", str(copy / "outputs" / "check")], cwd=copy,
                         env=tool_env(), capture_output=True, text=True, timeout=600)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("lorax: error:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "changed since the manifest was written" in lines[0] and str(image) in lines[0]

    # the copy's MLflow store: its runs write under the copy's mlartifacts/, its registry loads the copy's models
    from lorax.config import load_params
    from pipelines.tracking.tracker import Tracker

    tracker = Tracker(load_params(copy / "params.yaml"), copy)
    note = tmp_path / "note.txt"
    note.write_text("made in the copy")
    tracker.log_artifact(parent_run(copy), note)
    assert list((copy / "mlartifacts").rglob("note.txt"))
    assert all(v.source.startswith((copy / "mlartifacts").as_uri())
               for v in tracker.client.search_model_versions("name = 'lorax-attributor'"))
    assert tree(repo) == original, "the copy wrote into the original's folder"


def test_an_older_manifest_with_an_absolute_root_reads_under_data_root(repo: Path, tmp_path: Path, caplog) -> None:
    import pandas as pd

    from lorax.data.manifest import read_manifest

    old = pd.read_parquet(repo / "data" / "manifests" / "deconv.parquet")
    old["root"] = "/elsewhere/the/original/data/zoo"  # what manifests held before: the folder they were made in
    path = tmp_path / "deconv.parquet"
    old.to_parquet(path, index=False)
    caplog.set_level("WARNING", logger="lorax.data.manifest")
    df = read_manifest(path, repo / "data" / "zoo")
    assert set(df["root"]) == {str(repo / "data" / "zoo")}
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "absolute dataset root /elsewhere" in notes[0] and "\n" not in notes[0]
    from lorax.data.manifest import ManifestError

    old["root"] = "../../etc"  # an edited manifest cannot name a folder above data.root
    old.to_parquet(path, index=False)
    with pytest.raises(ManifestError, match="outside data.root"):
        read_manifest(path, repo / "data" / "zoo")


def survivors(root: Path) -> list[str]:
    """Processes working in ``root`` other than warm stage servers (a server's forked stage is its child)."""
    procs = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.readlink(p / "cwd") != str(root):
                continue
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            procs[int(p.name)] = (ppid, (p / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    servers = {pid for pid, (ppid, cmd) in procs.items() if "pipelines.warm" in cmd
               and "pipelines.warm" not in procs.get(ppid, (0, ""))[1]}
    return [f"{pid} {cmd}" for pid, (_, cmd) in procs.items() if pid not in servers and pid != os.getpid()]


def wait_for_next_checkpoint(ckpt: Path, timeout_s: float = 120) -> None:
    """Until the epoch checkpoint is replaced by the next epoch's (written atomically: a new file). The trainer
    writes an epoch's checkpoint just before it reports the epoch (a resumed task never reports one twice), so a
    kill right after the first checkpoint rightly records epoch 0; on a loaded machine that gap is wide enough to hit.
    The second checkpoint comes after the first epoch was reported, which is the case this test is about."""
    first = ckpt.stat().st_ino
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if ckpt.stat().st_ino != first:
                return
        except FileNotFoundError:  # between the old file and the rename of the new one, or the task finished
            pass
        time.sleep(0.01)
    raise AssertionError(f"{ckpt} was not replaced by a next epoch's in {timeout_s} s")


def test_kill_9_of_dvc_repro_takes_its_stage_along_and_the_rerun_resumes(repo: Path) -> None:
    append_to_stream(repo / "params.yaml", "nnconv", root=repo)
    ckpt = repo / "state" / "nnconv.resume" / "checkpoint.pt"
    proc = repro_until(repo, ckpt)
    try:
        wait_for_next_checkpoint(ckpt)
        os.kill(proc.pid, signal.SIGKILL)  # DVC alone, as `kill -9 <pid>` does
        proc.wait()
        deadline = time.time() + 30
        while survivors(repo) and time.time() < deadline:
            time.sleep(0.1)
        assert not survivors(repo), f"stage processes outlived dvc repro: {survivors(repo)}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # (the test's own clean-up, whatever happened)
    assert not (repo / "state" / "nnconv" / "state.json").exists(), "training finished before it was killed"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lorax-zoo-5").experiment_id
    [run] = client.search_runs([exp], "tags.`lorax.task` = 'nnconv'")
    assert run.info.status == "KILLED" and int(run.data.tags["lorax.epoch_reached"]) >= 1

    res = dvc(repo, "repro")
    # (check, synth and prepare of nnconv finished before the kill: DVC recorded them)
    assert stages_ran(res.stdout) == [*(f"{s}@nnconv" for s in ("train", "select", "evaluate", "register")), "report"]
    assert "resuming from the checkpoint of epoch" in res.stderr
    [after] = client.search_runs([exp], "tags.`lorax.task` = 'nnconv'")
    steps = [m.step for m in client.get_metric_history(after.info.run_id, "loss")]
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert sorted(steps) == [1, 2, 3], f"per-epoch metrics duplicated or missing: {sorted(steps)}"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_cold_stage_stops_when_its_starter_is_killed(tmp_path: Path) -> None:
    """Without the warm server (``LORAX_WARM=0``) the stage process itself watches its starter, here through a
    shell that stays (as DVC runs commands): ``kill -9`` of the starter stops it as SIGTERM would (the step sees
    it, so a training ends its MLflow run)."""
    marker = tmp_path / "stopped"
    stage = ("import os, time\nfrom pipelines import lifetime\nlifetime.stop_on_signals()\n"
             "assert lifetime.die_with_starter(grace_s=5)\n"  # the pid is printed inside the try: on a busy machine
             "try:\n    print(os.getpid(), flush=True)\n    time.sleep(120)\n"  # SIGTERM may come before the sleep
             "except lifetime.Stopped as e:\n"
             f"    open({str(marker)!r}, 'w').write(str(e))\n")
    starter = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen(['sh', '-c', '{sys.executable} -c \"$0\"; true', {stage!r}], stdout=sys.stdout)\n"
        "time.sleep(120)")], stdout=subprocess.PIPE, text=True, cwd=REPO, env=tool_env())
    try:
        stage_pid = int(starter.stdout.readline())  # the stage, watching; its parent is the shell
        assert Path(f"/proc/{stage_pid}/comm").exists()
        os.kill(starter.pid, signal.SIGKILL)
        deadline = time.time() + 20
        while _alive(stage_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(stage_pid), "the stage outlived its starter"
        assert marker.read_text() == "stopped by SIGTERM"
    finally:
        starter.kill()
        starter.wait()
