"""``lorax train``: a whole stream from manifests in one process, printed matrix, metrics.json, bad settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from lorax.config import params_to_dict
from tests.helpers import tiny_params


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


def test_train_prints_matrix_and_writes_metrics(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(zoo, out, "--method", "probe", "-S", "train.epochs=1", "-S", "eval.batch_size=16") == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "probe" and metrics["tasks"] == ["deconv", "nnconv"]
    assert "accuracy matrix R[i, j]" in printed
    lines = printed.splitlines()
    row0 = next(line for line in lines if line.startswith("deconv "))
    assert row0.split()[1:] == [f"{v:.1f}" for v in metrics["acc_matrix"][0]]
    assert f"probe: AA {metrics['aa']:.2f}  AAF {metrics['aaf']:.2f}  BWT {metrics['bwt']:.2f}" in printed
    summary = json.loads(lines[-1])
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
