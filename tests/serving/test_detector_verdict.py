"""The detector's verdict beside the attributor's: `lorax predict --detector` (a checkpoint, its folder, or
models:/lorax-detector@champion in a real sqlite registry) and the served model bundling the detector."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipelines.cli import main
from lorax.serving.detector import DETECTOR_COLUMNS
from lorax.serving.predict import COLUMNS
from tests.detect.synth import TINY_DETECT, make_zoo
from tests.helpers import tiny_params


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder with detector.safetensors, metrics.json and scores.parquet; the zoo's manifests) of a tiny detector."""
    from lorax.detect.runner import run_detect

    root = tmp_path_factory.mktemp("detector_verdict")
    manifests = make_zoo(root, n_train=8, n_val=4, size=20)
    run_detect(tiny_params(None, **TINY_DETECT), manifests, root / "detect")
    return root / "detect", manifests


def _images(stream, detector: tuple[Path, Path], tmp_path: Path) -> list[Path]:
    zoo = detector[1].parent / "images"
    small = tmp_path / "small.png"
    Image.new("RGB", (12, 12)).save(small)  # smaller than both crops: an error row for each model
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    return [*sorted((zoo / "checker_b" / "val").rglob("*.png"))[:3], *sorted((zoo / "stripes" / "val").rglob("*.png"))[:3],
            *stream.val_images("deconv")[:2], small, bad]


def _predict(args: list[str], out: Path) -> pd.DataFrame:
    assert main(["predict", *args, "--out", str(out), "--no-openset"]) == 0
    return pd.DataFrame(json.loads(out.read_text()))


def test_predict_adds_the_detectors_verdict_and_agreement(stream, detector, tmp_path: Path, capsys) -> None:
    images = _images(stream, detector, tmp_path)
    plain = _predict([*map(str, images), "--model", str(stream.state)], tmp_path / "plain.json")
    both = _predict([*map(str, images), "--model", str(stream.state), "--detector", str(detector[0])],
                    tmp_path / "both.json")
    assert "detector" in capsys.readouterr().out
    assert list(plain.columns) == COLUMNS and list(both.columns) == COLUMNS + DETECTOR_COLUMNS
    pd.testing.assert_frame_equal(both[COLUMNS], plain)  # the attributor's own verdict is left as it was
    # the detector's probability is the one its evaluation wrote for the same val image (same checkpoint, centre crop)
    scores = pd.read_parquet(detector[0] / "scores.parquet")
    by_path = dict(zip(scores["path"], scores["score"], strict=True))
    for img, p in zip(images[:6], both["detector_fake_probability"][:6], strict=True):
        rel = str(img.relative_to(detector[1].parent / "images"))
        assert p == pytest.approx(by_path[rel], abs=1e-5)
    threshold = json.loads((detector[0] / "metrics.json").read_text())["threshold"]
    ok = both["detector_verdict"].notna()
    assert ok.tolist() == [True] * 8 + [False, False]
    assert (both.loc[ok, "detector_verdict"] == both.loc[ok, "detector_fake_probability"].map(
        lambda p: "fake" if p >= threshold else "real")).all()
    assert "smaller than the detector's crop 16" in both["detector_error"].iloc[8]
    scored = both["verdict"].notna() & ok
    want = (both["verdict"] == both["detector_verdict"]).map({True: "agree", False: "disagree"})
    assert (both.loc[scored, "agreement"] == want[scored]).all() and both.loc[~scored, "agreement"].isna().all()


def test_detector_from_the_registry_and_clear_errors(stream, detector, tmp_path: Path, monkeypatch, capsys) -> None:
    from pipelines.tracking.detector_registry import register_detector
    from pipelines.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = tiny_params(None, tracking__uri=uri)
    metrics = json.loads((detector[0] / "metrics.json").read_text())
    rec = register_detector(Tracker(params, tmp_path), detector[0] / "detector.safetensors", metrics,
                            experiment="lorax-test-detect", min_ap=0.0, name="lorax-detector")
    assert rec["aliases"] == ["champion"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LORAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    images = list(map(str, _images(stream, detector, tmp_path)[:3]))
    local = _predict([*images, "--model", str(stream.state), "--detector", str(detector[0] / "detector.safetensors")],
                     tmp_path / "local.json")
    served = _predict([*images, "--model", str(stream.state), "--detector", "models:/lorax-detector@champion"],
                      tmp_path / "registry.json")
    pd.testing.assert_frame_equal(served, local)

    out = str(tmp_path / "p.csv")
    for arg, msg in (("models:/no-such-detector@champion", "--detector models:/no-such-detector@champion: not found"),
                     (str(tmp_path), "no detector checkpoint there"),
                     (str(detector[0] / "metrics.json"), "never unpickles")):
        assert main(["predict", images[0], "--model", str(stream.state), "--detector", arg, "--out", out]) == 2
        assert msg in capsys.readouterr().err
    assert not Path(out).exists()


def test_the_served_model_bundles_the_detector(stream, detector, tmp_path: Path) -> None:
    """save_attributor(detector=...) packs the checkpoint; the pyfunc (what `mlflow models serve` runs) and
    `lorax predict --model MODEL_FOLDER` then both answer with the detector's columns, the same values."""
    import mlflow.pyfunc

    from pipelines.serving.pyfunc import save_attributor

    save_attributor(tmp_path / "model", stream.state, detector=detector[0])
    images = _images(stream, detector, tmp_path)
    got = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(
        pd.DataFrame({"image": [p.read_bytes() for p in images], "name": list(map(str, images))}))
    assert list(got.columns) == COLUMNS + DETECTOR_COLUMNS
    expected = _predict([*map(str, images), "--model", str(tmp_path / "model")], tmp_path / "p.json")
    for col in ("verdict", *DETECTOR_COLUMNS):
        for a, b in zip(got[col], expected[col], strict=True):
            if b is None or (isinstance(b, float) and b != b):
                assert a is None, col
            elif isinstance(b, float):
                assert a == pytest.approx(b, abs=1e-5), col
            else:
                assert a == b, col
    assert got["detector_verdict"].notna().sum() == 8
