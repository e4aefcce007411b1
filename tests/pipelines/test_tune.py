"""``lorax tune`` on the tiny zoo: grouped folds of the train split (val never read), the same stream code as
``lorax train``, the tuned params file, the table and its MLflow run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lorax.config import ConfigError, load_params, params_to_dict, parse_params
from lorax.data.groups import row_groups
from lorax.data.manifest import read_manifest
from pipelines.params_text import set_path
from pipelines.tracking.flat import flatten
from tests.helpers import PARAMS_YAML, TINY_OVERRIDES, prepared_zoo, tiny_params

GRID = {"model.img_size": [12, 16]}


def params_file(path: Path, **settings) -> Path:
    """The real params.yaml's text, shrunk like tiny_params and edited as text (its comments kept)."""
    lines = PARAMS_YAML.read_text().splitlines(keepends=True)
    for k, v in settings.items():
        set_path(lines, k, v)
    path.write_text("".join(lines))
    return path


def write_groups(root: Path, tasks: list[str], n: int) -> None:
    """A dataset manifest.csv that groups the k-th real train image of every task with its (k+1)-th: groups span
    tasks (like a prompt drawn by several generators) and hold several files."""
    rows = [{"path": f"{t}/train/0_real/{t}_train_real_{k:05d}.png", "group": f"g{k // 2}"}
            for t in tasks for k in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from pipelines.cli import main

    root = tmp_path_factory.mktemp("tune")
    params = tiny_params(root)
    write_groups(Path(params.data.root), params.tasks, params.zoo.train_per_class)
    prepared_zoo(root, params)
    for t in params.tasks:  # val is never read: with its images gone, tune still runs
        shutil.rmtree(Path(params.data.root) / t / "val")
    settings = {**TINY_OVERRIDES, "data.root": params.data.root, "data.manifests": params.data.manifests,
                "cache.dir": str(root / "cache"), "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
                "tune.folds": 2, "tune.tasks": 2, "tune.grid": GRID}
    src = params_file(root / "P.yaml", **settings)
    out = root / "P2.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the tracking store's artifacts go under the project (here: root), never in the repo
        rc = main(["tune", "--params", str(src), "--out", str(out)])
    assert rc == 0
    return root, src, out, json.loads((root / "P2.tune.json").read_text())


def test_tuned_params_load_and_differ_only_in_grid_keys(tuned):
    root, src, out, doc = tuned
    before, after = flatten(params_to_dict(load_params(src))), flatten(params_to_dict(load_params(out)))
    assert {k for k in before if before[k] != after[k]} <= set(GRID)
    assert after["model.img_size"] == doc["chosen"]["model.img_size"]
    changed = [(a, b) for a, b in zip(src.read_text().splitlines(), out.read_text().splitlines(), strict=True) if a != b]
    assert len(changed) == len(doc["changed"]) <= 1  # one line at most, its comment kept
    for a, b in changed:
        assert a.split("#", 1)[1] == b.split("#", 1)[1]


def test_the_table_has_every_combination_and_fold(tuned):
    root, _, _, doc = tuned
    assert doc["search"] == "product" and doc["tasks"] == ["deconv", "nnconv"] and doc["folds"] == 2
    assert sorted(r["model.img_size"] for r in doc["table"]) == GRID["model.img_size"]
    assert all(len(r["folds"]) == 2 for r in doc["table"]) and sum(r["chosen"] for r in doc["table"]) == 1
    assert sorted((r["setting"]["model.img_size"], r["fold"]) for r in doc["runs"]) == [(12, 0), (12, 1), (16, 0),
                                                                                         (16, 1)]
    csv = pd.read_csv(root / "P2.tune.csv")
    assert list(csv.columns[:4]) == ["model.img_size", "mean", "std", "bwt"] and len(csv) == 2


def test_only_train_rows_are_evaluated(tuned):
    root, _, _, doc = tuned
    tables = [pd.read_csv(f) for r in doc["runs"] for f in (Path(r["out"]) / "eval").glob("*.predictions.csv")]
    assert len(tables) == 4 * 2  # every run evaluated after each of its two tasks
    paths = pd.concat(tables)["path"].astype(str)
    assert len(paths) and paths.str.contains("/train/").all() and not paths.str.contains("/val/").any()


def test_groups_never_straddle_folds(tuned):
    root, *_ = tuned
    folds = sorted((root / "P2.tune").glob("folds-*/fold*"))
    assert len(folds) == 2
    held_out: list[str] = []
    for fold in folds:
        rows = pd.concat([read_manifest(f) for f in sorted(fold.glob("*.parquet"))], ignore_index=True)
        assert set(rows["split"]) == {"train", "val"}
        groups = row_groups(rows)
        assert any(g.startswith("g") for g in groups)  # the dataset's own groups were used
        train, val = set(groups[rows["split"] == "train"]), set(groups[rows["split"] == "val"])
        assert not train & val
        held_out += list(rows.loc[rows["split"] == "val", "path"])
    assert len(held_out) == len(set(held_out)) == len(rows)  # each train row held out once


def test_the_table_is_one_mlflow_run(tuned):
    from mlflow import MlflowClient

    root, *_ = tuned
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`lorax.kind` = 'tune'")
    assert len(runs) == 1
    run = runs[0]
    assert "chosen.model.img_size" in run.data.params and "best.pooled" in run.data.metrics
    files = {a.path for a in client.list_artifacts(run.info.run_id, "tune")}
    assert {"tune/table.json", "tune/P2.tune.json", "tune/P2.tune.csv", "tune/P2.yaml"} <= files


def test_an_unknown_grid_key_fails_naming_it(tmp_path, capsys):
    from pipelines.cli import main

    params = tiny_params(tmp_path)
    src = params_file(tmp_path / "P.yaml", **TINY_OVERRIDES, **{"data.root": params.data.root})
    rc = main(["tune", "--params", str(src), "--out", str(tmp_path / "P2.yaml"), "-S",
               "tune.grid={model.img_sz: [12, 16]}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.img_sz" in err and "tune.grid" in err and "img_size" in err
    assert not (tmp_path / "P2.yaml").exists()
    with pytest.raises(ConfigError, match="adapter.blockz"):
        parse_params({"stream": {"deconv": {"prev": "init"}}, "tune": {"grid": {"adapter.blockz": [1]}}})


def test_a_large_grid_is_searched_one_key_at_a_time(tmp_path):
    """Coordinate search from the params' own values (no training: a stand-in stream scores the settings)."""
    from pipelines.tune import tune

    params = tiny_params(tmp_path, tune__folds=2, tune__max_runs=3, adapter__last_k=1, eval__jpeg_control=[90],
                         tune__grid={"model.img_size": [12, 16], "train.views": [1, 2], "adapter.blocks": ["all", "last_k"]})
    prepared_zoo(tmp_path, params)
    ran: list[tuple] = []

    def fake_stream(p, manifests, out):
        ran.append((p.model.img_size, p.train.views, p.adapter.blocks, Path(manifests).name))
        assert p.tasks == ["deconv", "nnconv"] and Path(p.cache.dir).is_absolute()
        assert p.eval.jpeg_control is None  # the controls do not enter the metric: off
        score = 50 + 10 * (p.model.img_size == 12) + 5 * (p.train.views == 1) + 0 * (p.adapter.blocks == "last_k")
        return {"pooled_acc": score, "bwt": -1.0}

    result = tune(params, params.data.manifests, tmp_path / "work", run_stream=fake_stream)
    assert result.search == "coordinate"
    assert result.start == {"model.img_size": 16, "train.views": 2, "adapter.blocks": "all"}
    assert result.chosen == {"model.img_size": 12, "train.views": 1, "adapter.blocks": "all"}  # a tie: kept
    assert len(ran) == 4 * 2  # start, img_size 12, views 1, blocks last_k: each on 2 folds, none twice
    assert len(result.table()) == 4


def test_set_path_keeps_comments_and_layout():
    text = PARAMS_YAML.read_text()
    lines = text.splitlines(keepends=True)
    set_path(lines, "model.img_size", 112)
    set_path(lines, "model.kwargs.depth", 4)
    set_path(lines, "tracking.gate.max_ap_drop", 3.0)
    new = "".join(lines)
    diff = [(a, b) for a, b in zip(text.splitlines(), new.splitlines(), strict=True) if a != b]
    assert len(diff) == 3 and all(a.split("#")[1:] == b.split("#")[1:] for a, b in diff)
    import yaml

    raw = yaml.safe_load(new)
    assert raw["model"]["img_size"] == 112 and raw["model"]["kwargs"] == {"depth": 4}
    assert raw["tracking"]["gate"]["max_ap_drop"] == 3.0


def test_trace_experts_on_or_off_is_chosen_like_any_setting(tmp_path):
    """The realworld profile's grid switches the trace experts (``continual.method: [lorax, lorax+trace]``): both
    run as real streams on the folds and the result names the better one."""
    from pipelines.tune import tune

    params = tiny_params(tmp_path, tune__folds=2, tune__tasks=2,
                         tune__grid={"continual.method": ["lorax", "lorax+trace"]})
    prepared_zoo(tmp_path, params)
    result = tune(params, params.data.manifests, tmp_path / "work")
    assert result.search == "product"
    table = {r["continual.method"]: r for r in result.table()}
    assert set(table) == {"lorax", "lorax+trace"}
    for row in table.values():
        assert len(row["folds"]) == 2 and all(0.0 <= f <= 100.0 for f in row["folds"])
    chosen = table[result.chosen["continual.method"]]
    assert chosen["chosen"] and chosen["mean"] == max(r["mean"] for r in table.values())  # ties: the faster


def test_coverage_metric_caps_each_task_and_breaks_ties_by_accuracy(tmp_path):
    """``tune.metric: coverage``: a task above the target cannot make up for one below it, and of the settings whose
    sets reach the target on every task the more accurate wins (stand-in streams: the rule, not the training)."""
    from pipelines.tune import tune

    params = tiny_params(tmp_path, tune__folds=2, tune__metric="coverage", continual__set_coverage=0.9,
                         tune__grid={"continual.calibration_share": [0.1, 0.3, 0.5]})
    prepared_zoo(tmp_path, params)
    figures = {0.1: ([99.0, 81.0], 70.0),  # mean 90.0 uncapped, but one task under-covered: the lowest score
               0.3: ([92.0, 90.0], 65.0),  # every task reaches 90: ties with 0.5, less accurate
               0.5: ([95.0, 96.0], 68.0)}

    def fake_stream(p, manifests, out):
        cov, pooled = figures[p.continual.calibration_share]
        return {"pooled_acc": pooled, "bwt": 0.0, "set_coverage_per_task": cov}

    result = tune(params, params.data.manifests, tmp_path / "work", run_stream=fake_stream)
    table = {r["continual.calibration_share"]: r for r in result.table()}
    assert table[0.1]["mean"] == pytest.approx((90.0 + 81.0) / 2)  # 99 counts as 90
    assert table[0.3]["mean"] == table[0.5]["mean"] == 90.0
    assert table[0.5]["pooled"] == 68.0
    assert result.chosen == {"continual.calibration_share": 0.5}
    with pytest.raises(ConfigError, match="continual.set_coverage is off"):
        tune(tiny_params(tmp_path, tune__metric="coverage", continual__set_coverage=None), params.data.manifests,
             tmp_path / "work2", run_stream=fake_stream)


def test_calibration_share_is_chosen_by_held_out_set_coverage(tmp_path):
    """A real tune of the memory's calibration share on the tiny zoo: every fold's figure is the capped per-task
    coverage of that fold run's own metrics, and the table carries its accuracy."""
    from pipelines.tune import tune

    params = tiny_params(tmp_path, tune__folds=2, tune__tasks=2, tune__metric="coverage",
                         tracking__uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                         tune__grid={"continual.calibration_share": [0.0, 0.5]})
    prepared_zoo(tmp_path, params)
    result = tune(params, params.data.manifests, tmp_path / "work")
    target = 100.0 * params.continual.set_coverage
    assert len(result.runs) == 4
    for run in result.runs:
        details = json.loads((Path(run.out) / "metrics_details.json").read_text())
        per_task = details["set_coverage_per_task"]
        assert len(per_task) == 2
        assert run.metric == pytest.approx(sum(min(c, target) for c in per_task) / 2)
        assert 0.0 <= run.metric <= target and run.pooled is not None
    table = result.table()
    best = max(table, key=lambda r: (r["mean"], r["pooled"], -r["seconds"]))  # Search.score's order
    assert best["chosen"] and result.chosen == {"continual.calibration_share": best["continual.calibration_share"]}
    from mlflow import MlflowClient

    from pipelines.tune_report import format_table, log_to_mlflow

    assert "pooled" in format_table(result).splitlines()[1]  # the accuracy beside the coverage metric
    run_id, uri = log_to_mlflow(params, result, [], root=tmp_path)
    history = MlflowClient(uri).get_metric_history(run_id, "cv.pooled")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [r["pooled"] for r in table]
    assert MlflowClient(uri).get_run(run_id).data.metrics["best.coverage"] == best["mean"]
