"""``lorax train``: a whole stream from manifests in one process, printed matrix, metrics.json, bad settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from lorax.config import params_to_dict
from lorax.continual.summary import read_metrics
from tests.helpers import BIN, tiny_params


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny params file and its two-task zoo, built with ``lorax data synth`` and ``lorax data prepare``."""
    root = tmp_path_factory.mktemp("cli")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_to_dict(tiny_params(root)), sort_keys=False))
    assert main(["data", "synth", "--params", str(params_file)]) == 0
    assert main(["data", "prepare", "--params", str(params_file)]) == 0
    manifests = root / "manifests"
    assert sorted(p.stem for p in manifests.glob("*.parquet")) == ["deconv", "nnconv"]
    return params_file, manifests


def _train(zoo, out: Path, *extra: str) -> int:
    params_file, manifests = zoo
    return main(["train", "--params", str(params_file), "--manifests", str(manifests), "--out", str(out), *extra])


def test_metrics_json_is_a_short_row_of_scalars_and_the_details_hold_the_rest(zoo, tmp_path):
    """`dvc metrics show` prints one column per key of metrics.json: a handful of scalars keeps it within a
    terminal; the accuracy matrix and the per-task lists live in metrics_details.json beside it."""
    import subprocess

    out = tmp_path / "out"
    assert _train(zoo, out, "--method", "probe", "-S", "train.epochs=1") == 0
    head = json.loads((out / "metrics.json").read_text())
    details = json.loads((out / "metrics_details.json").read_text())
    assert all(v is None or isinstance(v, (str, int, float)) for v in head.values()), head
    assert 8 <= len(head) <= 20 and {"aa", "aaf", "bwt", "binary_acc", "n_tasks", "trainable_params", "set_coverage",
                                     "set_size"} <= set(head)
    assert len(details["set_coverage_per_task"]) == len(details["set_size_per_task"]) == 2  # prediction sets
    assert head["n_tasks"] == 2 and head["trainable_params"] == details["trainable_params_per_task"][-1]
    assert len(details["acc_matrix"]) == 2 and details["tasks"] == ["deconv", "nnconv"]
    assert not set(head) & set(details)
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=out, check=True)
    shown = subprocess.run([str(BIN / "dvc"), "metrics", "show", "metrics.json"], cwd=out, check=True,
                           capture_output=True, text=True).stdout
    assert "aaf" in shown and max(len(line) for line in shown.splitlines()) <= 200, shown


def test_train_prints_matrix_and_writes_metrics(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(zoo, out, "--method", "probe", "-S", "train.epochs=1", "-S", "eval.batch_size=16") == 0
    printed = capsys.readouterr().out
    metrics = read_metrics(out / "metrics.json")
    assert metrics["method"] == "probe" and metrics["tasks"] == ["deconv", "nnconv"]
    assert "accuracy matrix R[i, j]" in printed and re.search(r"^aaf +\d+\.\d\d$", printed, re.M)
    lines = printed.splitlines()
    row0 = next(line for line in lines if line.startswith("deconv "))
    assert row0.split()[1:] == [f"{v:.1f}" for v in metrics["acc_matrix"][0]]
    assert f"probe: AA {metrics['aa']:.2f}  AAF {metrics['aaf']:.2f}  BWT {metrics['bwt']:.2f}" in printed
    summary = json.loads(lines[-1])  # the last line: for scripts
    assert summary == {k: metrics[k] for k in ("aa", "aaf", "bwt", "forgetting", "binary_acc")}
    # -S reached the run: the saved state records the overridden settings
    state = json.loads((out / "state" / "nnconv" / "state.json").read_text())
    assert state["params"]["eval"]["batch_size"] == 16 and state["params"]["continual"]["method"] == "probe"


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.epochz=2", r"train\.epochz: unknown key"),
        ("train.epochs=zero", r"train\.epochs"),
        ("train.epochs=0", r"train\.epochs"),
        ("train.epochs", r"expected KEY=VALUE"),
        ("train.epochs.max=2", r"train\.epochs"),
    ],
)
def test_bad_setting_is_a_clear_error(zoo, tmp_path, capsys, setting, message):
    out = tmp_path / "out"
    assert _train(zoo, out, "--method", "probe", "-S", setting) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorax: error:")
    assert re.search(message, err), err
    assert not (out / "metrics.json").exists()


def test_unknown_method_lists_the_known_ones(zoo, tmp_path, capsys):
    assert _train(zoo, tmp_path / "out", "--method", "nosuch") == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "lorax" in err and "probe" in err
