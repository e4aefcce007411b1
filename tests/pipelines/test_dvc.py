"""The DVC pipeline for real, in a temporary git repo: the first run, an appended generator that runs only its
own stages, a training stage killed mid-task that resumes, `dvc exp run -S`, metrics and plots.

The steps share one repo and each builds on the previous one's state, so they run as one test, in order (the
runner may shuffle tests)."""

from __future__ import annotations

import hashlib
import shutil
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from lorax.continual.summary import read_metrics
from pipelines.stream_edit import append_to_stream
from pipelines.cli.project import SHARE_FILES
from tests.helpers import BIN, dvc, dvc_project, repro_until, stages_ran, tool_env

pytestmark = pytest.mark.slow

STAGES = ("synth", "prepare", "train", "select", "evaluate", "register")


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def versions(root: Path) -> list[dict]:
    res = subprocess.run([str(BIN / "lorax"), "models", "list", "--json"], cwd=root, env=tool_env(),
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    # 3 epochs so that a training can be killed after its first epoch checkpoint
    return dvc_project(tmp_path_factory.mktemp("dvc") / "project", ["deconv"], train__epochs=3)


# Loaded by a stage but deliberately not among its deps (dvc.yaml's header says why): package markers, the file and
# settings plumbing every stage shares, the progress output (what a stage prints, not what it writes), and
# tracking/registry code outside register (where runs are logged does not change a model, as for the tracking
# settings).
UNDECLARED_OK = ("__init__.py", "lorax/config.py", "lorax/settings_base.py", "lorax/models/config.py",
                 "lorax/detect/config.py", "lorax/tune_config.py", "lorax/utils/io.py", "lorax/utils/progress.py", "lorax/registry.py",
                 "pipelines/layout.py", "pipelines/warm.py", "pipelines/lifetime.py", "pipelines/locks.py",
                 "pipelines/tracking/", "pipelines/serving/")


def declared_code(stage: str) -> list[str]:
    import yaml

    stages = yaml.safe_load((Path(__file__).parents[2] / "dvc.yaml").read_text())["stages"]
    spec = stages[stage.split("@")[0]]
    deps = (spec.get("do") or spec).get("deps", [])
    return [d for d in deps if isinstance(d, str) and d.split("/")[0] in ("lorax", "pipelines")]


def test_the_pipeline_from_first_run_to_a_clone(repo: Path, tmp_path: Path) -> None:
    """First run; an added generator; a killed training that resumes; a code change; `dvc exp run`; a clone."""
    _first_run(repo, tmp_path)
    _moving_or_deleting_the_cache_leaves_every_stage_current(repo)
    _added_generator_runs_only_its_stages(repo)
    _killed_training_resumes_and_leaves_earlier_tasks_alone(repo)
    _a_code_change_reruns_what_it_affects(repo)
    _exp_run_with_a_changed_setting(repo)
    _a_clone_of_the_shared_run_redoes_no_work(repo, tmp_path)


# Put on PYTHONPATH as sitecustomize: when a stage process (``python -m pipelines.<stage>``) exits, it appends the
# project source files it loaded to the file named below.
RECORD_MODULES = """
import atexit, json, sys
from pathlib import Path


def _record():
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or not spec.name.startswith("pipelines."):
        return
    root, files = Path.cwd().resolve(), set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and mod.__name__.split(".")[0] in ("lorax", "pipelines"):
            p = Path(f).resolve()
            files.add(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p))
    with open(OUT, "a") as out:
        out.write(json.dumps({"module": spec.name.split(".", 1)[1], "files": sorted(files)}) + "\\n")


atexit.register(_record)
"""
STAGE_OF_MODULE = {"select_exemplars": "select", "check_params": "check"}


def _first_run(repo: Path, tmp_path: Path) -> None:
    loaded, site = tmp_path / "modules.jsonl", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"OUT = {str(loaded)!r}\n" + RECORD_MODULES)
    # cold stages (LORAX_WARM=0): a stage forked from the warm server holds every module the server preloaded
    res = dvc(repo, "repro", PYTHONPATH=str(site), LORAX_WARM="0")
    assert stages_ran(res.stdout) == ["check", "init", *(f"{s}@deconv" for s in STAGES), "report"]
    # every project source file a stage loaded is one of its declared deps (or a file deliberately left out)
    for line in loaded.read_text().splitlines():
        rec = json.loads(line)
        module = rec["module"]
        deps = declared_code(STAGE_OF_MODULE.get(module, module))
        assert f"pipelines/{module}.py" in deps
        missing = [f for f in rec["files"] if f.split("/")[0] in ("lorax", "pipelines")
                   and not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)
                   and not any(f.endswith(ok) if ok.endswith(".py") and "/" not in ok else f.startswith(ok)
                               for ok in UNDECLARED_OK)]
        assert not missing, f"{module} loads {missing} but dvc.yaml does not declare them"
    assert len(loaded.read_text().splitlines()) == 3 + len(STAGES)
    metrics = read_metrics(repo / "reports" / "metrics.json")
    # the keys of `lorax train`'s metrics.json (+ details)
    from lorax.config import load_params
    from lorax.continual.summary import summarize_stream
    from pipelines.layout import Layout

    params = load_params(repo / "params.yaml")
    lay = Layout.from_params(params, repo)
    evals = [json.loads(lay.eval("deconv").read_text())]
    assert set(metrics) == set(summarize_stream(params, evals, [lay.state("deconv")]))
    assert metrics["tasks"] == ["deconv"]
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert "aaf" in json.dumps(shown) and "acc_matrix" not in json.dumps(shown)  # the matrix: in the details file
    assert max(map(len, dvc(repo, "metrics", "show", "reports/metrics.json").stdout.splitlines())) <= 200
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]
    assert {"reports/plots/acc_matrix.png", "reports/plots/task_curves.png"} <= set(plots)
    assert sum(p[0]["type"] == "vega" for p in plots.values()) == 2
    v = versions(repo)
    assert len(v) == 1 and v[0]["aliases"] == ["champion"] and v[0]["tasks"] == ["deconv"]
    assert dvc(repo, "status").stdout.strip().endswith("up to date.")


def _moving_or_deleting_the_cache_leaves_every_stage_current(repo: Path) -> None:
    """The feature store is a cache: moving it (pointing $LORAX_CACHE_DIR at the new place, `cache.dir: null`) or
    deleting it makes no stage stale, not even `check`; writing the new place into params.yaml instead re-runs only
    `check`, whose record is constant, so no stage's outputs are touched."""
    import yaml

    text = (repo / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    assert raw["cache"]["dir"] is None and any((repo / "cache" / "features").glob("*/*.safetensors"))
    (repo / "elsewhere").mkdir()
    shutil.move(repo / "cache", repo / "elsewhere" / "cache")
    moved = str(repo / "elsewhere" / "cache")
    assert dvc(repo, "status", LORAX_CACHE_DIR=moved).stdout.strip().endswith("up to date.")
    assert stages_ran(dvc(repo, "repro", LORAX_CACHE_DIR=moved).stdout) == []
    # the same move written into params.yaml: only the 1-s check (a misspelt key there must still stop dvc repro)
    raw["cache"]["dir"] = "elsewhere/cache"
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    status = dvc(repo, "status").stdout
    assert "check:" in status and "init:" not in status and "train@" not in status and "evaluate@" not in status
    assert stages_ran(dvc(repo, "repro").stdout) == ["check"]
    assert dvc(repo, "status").stdout.strip().endswith("up to date.")
    shutil.rmtree(repo / "elsewhere")  # deleted: nothing at all to redo
    assert dvc(repo, "status").stdout.strip().endswith("up to date.")
    (repo / "params.yaml").write_text(text)
    assert stages_ran(dvc(repo, "repro").stdout) in ([], ["check"])  # [] when DVC's run cache has check's record
    assert dvc(repo, "status").stdout.strip().endswith("up to date.")


def _added_generator_runs_only_its_stages(repo: Path) -> None:
    before = {p.name: tree_hash(p) for p in (repo / "state").iterdir() if p.is_dir()}
    lock_before = (repo / "dvc.lock").read_text()
    add = subprocess.run([str(BIN / "lorax"), "stream", "add", "--next"], cwd=repo, env=tool_env(),
                         capture_output=True, text=True)
    assert add.returncode == 0, add.stderr
    expected = ["check", *(f"{s}@nnconv" for s in STAGES), "report"]  # params.yaml changed: checked first
    # what `stream add` says will run is what DVC then runs; and it says dvc.lock is not committed yet
    assert f"`dvc status` shows 8 stage(s) to run: {', '.join(expected)}" in add.stdout, add.stdout
    assert "dvc.lock is not committed" in add.stdout
    res = dvc(repo, "repro")
    assert stages_ran(res.stdout) == expected
    assert {p: tree_hash(repo / "state" / p) for p in before} == before
    assert "train@deconv" in lock_before and "train@nnconv" in (repo / "dvc.lock").read_text()
    v = versions(repo)
    assert [x["tasks"] for x in v] == [["deconv"], ["deconv", "nnconv"]]
    assert read_metrics(repo / "reports" / "metrics.json")["tasks"] == ["deconv", "nnconv"]


def _killed_training_resumes_and_leaves_earlier_tasks_alone(repo: Path) -> None:
    before = {p.name: tree_hash(p) for p in (repo / "state").iterdir() if p.is_dir()}
    append_to_stream(repo / "params.yaml", "bilinconv", root=repo)
    ckpt = repo / "state" / "bilinconv.resume" / "checkpoint.pt"
    proc = repro_until(repo, ckpt)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (repo / "state" / "bilinconv" / "state.json").exists(), "training finished before it was killed"
    run_file = json.loads((ckpt.parent / "mlflow_run.json").read_text())

    res = dvc(repo, "repro")
    assert stages_ran(res.stdout) == [*(f"{s}@bilinconv" for s in ("train", "select", "evaluate", "register")),
                                      "report"]
    assert "resuming from the checkpoint of epoch" in res.stderr
    assert {p: tree_hash(repo / "state" / p) for p in before} == before
    info = json.loads((repo / "state" / "bilinconv" / "state.json").read_text())
    assert info["tasks"] == ["deconv", "nnconv", "bilinconv"] and len(info["epochs"]) == 3
    assert info["tracking"]["run_id"] == run_file["run_id"]  # the resumed task continued its MLflow run
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = c.search_runs(c.search_experiments()[0].experiment_id, "tags.`lorax.task` = 'bilinconv'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {m.step for m in c.get_metric_history(runs[0].info.run_id, "loss")} == {1, 2, 3}


def _a_code_change_reruns_what_it_affects(repo: Path) -> None:
    """Editing the trainer makes every training stale, never the data stages; editing the stream summary (the
    report's figures, also in the registered versions' model cards) makes only register and report stale."""
    def stale_after_editing(rel: str) -> set[str]:
        path = repo / rel
        text = path.read_text()
        path.write_text(text + "\n# edited\n")
        try:
            return set(json.loads(dvc(repo, "status", "--json").stdout))
        finally:
            path.write_text(text)

    tasks = ("deconv", "nnconv", "bilinconv")
    trainer = stale_after_editing("lorax/continual/trainer.py")
    assert {f"train@{t}" for t in tasks} <= trainer
    assert not {s for s in trainer if s.startswith(("synth@", "prepare@"))}
    assert stale_after_editing("lorax/continual/summary.py") == {f"register@{t}" for t in tasks} | {"report"}
    assert stale_after_editing("lorax/data/prepare.py") == {f"prepare@{t}" for t in tasks}
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}


def _exp_run_with_a_changed_setting(repo: Path) -> None:
    """`dvc exp run -S` works and retrains nothing for a setting that training does not read."""
    env = tool_env()
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "pipeline run"], cwd=repo, env=env, check=True, capture_output=True)
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    # an evaluation setting would re-run evaluation (and the selection's feature pass) only, never training
    params = repo / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("  batch_size: 32\n  crops: 1", "  batch_size: 16\n  crops: 1"))
    try:
        changed = set(json.loads(dvc(repo, "status", "--json").stdout))
    finally:
        params.write_text(text)
    tasks = ("deconv", "nnconv", "bilinconv")
    assert changed == {"check"} | {f"{s}@{t}" for s in ("select", "evaluate") for t in tasks}
    n_before = versions(repo)
    res = dvc(repo, "exp", "run", "-S", "tracking.gate.union_tolerance=100", "-S", "tracking.gate.max_task_drop=100")
    # registration re-runs; the models are unchanged, so each keeps its version (registration is idempotent)
    assert stages_ran(res.stdout) == ["check", "register@deconv", "register@nnconv", "register@bilinconv"]
    assert versions(repo) == n_before
    from lorax.config import load_params

    assert load_params(repo / "params.yaml").tracking.gate.union_tolerance == 100  # -S applied to the workspace
    assert "Ran experiment" in res.stdout + res.stderr


def _a_clone_of_the_shared_run_redoes_no_work(repo: Path, tmp_path: Path) -> None:
    """The README's "Sharing a run": commit dvc.lock and the outputs DVC leaves to git, `dvc push`; a clone that
    runs `dvc pull` only rebuilds the built-in zoo (synth@T) and trains, selects, evaluates and registers nothing."""
    env = tool_env()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, env=env, check=True, capture_output=True, text=True)
    dvc(repo, "remote", "add", "-d", "-f", "store", str(tmp_path / "remote"))
    git("add", *SHARE_FILES, ".dvc/config")
    git("commit", "-qm", "pipeline run")
    assert "dvc.lock" not in git("status", "--porcelain").stdout
    dvc(repo, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], env=env, check=True)
    dvc(clone, "pull")
    tasks = list(read_metrics(repo / "reports" / "metrics.json")["tasks"])
    # the built-in zoo is not in DVC's cache (it is prepare's input, not an output): until synth has rebuilt it,
    # prepare's input is missing
    assert set(json.loads(dvc(clone, "status", "--json").stdout)) == {f"{s}@{t}" for t in tasks
                                                                     for s in ("synth", "prepare")}
    res = dvc(clone, "repro")
    assert stages_ran(res.stdout) == [f"synth@{t}" for t in tasks]
    assert json.loads(dvc(clone, "status", "--json").stdout) == {}
    for t in tasks:  # the pulled models are the ones trained here
        assert tree_hash(clone / "state" / t) == tree_hash(repo / "state" / t)
