"""End-to-end detector runs on a tiny synthetic zoo: metrics file, checkpoint, CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.cli import main
from lorax.data.manifest import read_manifest
from lorax.detect.detector import build_detector, load_detector
from lorax.detect.evaluate import predict_scores
from lorax.detect.runner import detect_params, run_detect
from lorax.models.backbone_factory import create_backbone
from lorax.registry import DETECTORS
from tests.helpers import PARAMS_YAML, tiny_cli_sets, tiny_params
from tests.detect.synth import make_zoo

DETECT = {"detect__train_tasks": ["checker_a"], "detect__blocks": 2, "detect__epochs": 6, "detect__lr": 5e-3,
          "detect__batch_size": 16, "detect__blur_sigmas": [1, 3], "detect__jpeg_qualities": [80, 40]}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("detect_zoo"), n_train=32, n_val=10)


@pytest.fixture(scope="module")
def mole_run(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("mole_out")
    params = tiny_params(None, **DETECT)
    return run_detect(params, zoo, out, method="mole"), out


def test_detectors_are_registered() -> None:
    assert {"mole", "probe", "shared", "separate"} <= set(DETECTORS.names())


def test_mole_run_writes_metrics_in_range(mole_run: tuple[dict, Path]) -> None:
    metrics, out = mole_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert {"map", "mean_acc", "per_generator", "threshold", "robustness"} <= set(metrics)
    assert metrics["eval_tasks"] == ["checker_b", "stripes"] and metrics["train_tasks"] == ["checker_a"]
    assert set(metrics["per_generator"]) == {"checker_b", "stripes"}
    for m in metrics["per_generator"].values():
        assert set(m) >= {"ap", "acc", "real_acc", "fake_acc"}
        assert all(0 <= m[k] <= 100 for k in ("ap", "acc", "real_acc", "fake_acc"))
        assert m["n_real"] == m["n_fake"] == 10
        assert m["acc"] == pytest.approx((m["real_acc"] + m["fake_acc"]) / 2)  # balanced here
    pg = metrics["per_generator"]
    assert metrics["map"] == pytest.approx(np.mean([m["ap"] for m in pg.values()]))
    assert metrics["mean_acc"] == pytest.approx(np.mean([m["acc"] for m in pg.values()]))
    assert 0 <= metrics["threshold"] <= 1
    assert set(metrics["robustness"]["blur"]) == {"1", "3"} and set(metrics["robustness"]["jpeg"]) == {"80", "40"}
    assert all(0 <= v <= 100 for curve in metrics["robustness"].values() for v in curve.values())
    # checker_b carries the training generator's fingerprint (another period-2 checkerboard): easy transfer
    assert pg["checker_b"]["ap"] > 80
    assert metrics["seen"]["checker_a"]["ap"] > 80
    assert len(metrics["history"]) == 6 and metrics["history"][-1]["bce"] < metrics["history"][0]["bce"]
    assert 0 < metrics["history"][-1]["balance"] and metrics["history"][-1]["expert_max_share"] < 1
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_reloads_to_the_same_scores(mole_run: tuple[dict, Path], zoo: Path) -> None:
    metrics, out = mole_run
    det, threshold, info = load_detector(out / "detector.safetensors")
    assert threshold == metrics["threshold"] and info["method"] == "mole"
    assert sum(p.numel() for p in det.trainable_parameters()) == metrics["trainable_params"]
    scores = pd.read_parquet(out / "scores.parquet")
    df = read_manifest(zoo / "checker_b.parquet")
    df = df[df["split"] == "val"].reset_index(drop=True)
    info_bb = det.backbone.info
    got = predict_scores(det, df, 16, info_bb.mean, info_bb.std, 32, torch.device("cpu"))
    want = scores[scores["task"] == "checker_b"]["score"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    fresh = build_detector(tiny_params().model, tiny_params(None, **DETECT).detect, "mole")
    with pytest.raises(ValueError, match="does not fit"):
        fresh.load_trainable_state_dict({"head.weight": torch.zeros(1, fresh.backbone.embed_dim)})


def test_cli_probe_run_with_an_extra_test_set(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = make_zoo(tmp_path / "other", n_train=4, n_val=3, seed=5, generators={"stripes2": ("stripes", 30.0, 1)})
    sets = [s for s in tiny_cli_sets() if s != "-S"] + ["detect.epochs=1", "detect.blur_sigmas=[2]", "detect.jpeg_qualities=[50]", "detect.batch_size=32"]
    argv = ["detect", "--method", "probe", "--train-tasks", "checker_a,stripes", "--manifests", str(zoo),
            "--out", str(tmp_path / "out"), "--params", str(PARAMS_YAML), "--eval-extra", f"other={other}"]
    for s in sets:
        argv += ["-S", s]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["method"] == "probe" and metrics["eval_tasks"] == ["checker_b"]
    embed_dim = create_backbone(tiny_params().model).embed_dim
    assert metrics["trainable_params"] == embed_dim + 1  # a linear probe: the head only
    assert set(metrics["seen"]) == {"checker_a", "stripes"}
    extra = metrics["extra"]["other"]
    assert extra["eval_tasks"] == ["stripes2"] and 0 <= extra["map"] <= 100
    assert extra["per_generator"]["stripes2"]["n_real"] == 4 + 3  # a test-only set: both splits are scored
    assert set(extra["robustness"]["blur"]) == {"2"}
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert set(scores["set"]) == {"main", "other"} and len(scores) == 20 + 14
    assert "checker_b" in capsys.readouterr().out
    assert (tmp_path / "out" / "detector.safetensors").is_file()
    assert main(argv[:2] + ["moe"] + argv[3:]) == 2  # unknown method: a settings error, not a traceback
    assert main(argv + ["--eval-extra", "other"]) == 2  # not NAME=DIR


def test_bad_input_errors(zoo: Path, tmp_path: Path) -> None:
    params = tiny_params(None, **DETECT)
    with pytest.raises(FileNotFoundError, match="checker_x"):
        run_detect(params, zoo, tmp_path, train_tasks=["checker_x"])
    with pytest.raises(ValueError, match="nothing unseen"):
        run_detect(params, zoo, tmp_path, train_tasks=["checker_a", "checker_b", "stripes"])
    with pytest.raises(ValueError, match="detect.expert_ranks"):
        run_detect(tiny_params(None, **DETECT, detect__expert_ranks=[]), zoo, tmp_path, method="mole")
    with pytest.raises(ValueError, match="detect.blocks"):
        run_detect(tiny_params(None, **{**DETECT, "detect__blocks": 5}), zoo, tmp_path, method="shared")
    with pytest.raises(FileNotFoundError, match="manifest folder"):
        run_detect(params, tmp_path / "nope", tmp_path)


def test_detect_model_is_the_detectors_own_backbone():
    p = tiny_params(None, detect__model={"backbone": "vit_tiny_patch16_224", "img_size": 16, "kwargs": {}})
    assert detect_params(p).model.backbone == "vit_tiny_patch16_224" and p.model.backbone == "convit_tiny"
    assert detect_params(tiny_params()).model == tiny_params().model  # null: the model section
