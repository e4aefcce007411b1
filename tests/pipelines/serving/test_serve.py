"""The registered model served by the real `mlflow models serve` answers what `lorax predict` writes."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cli import main
from lorax.serving.predict import COLUMNS
from lorax.serving.schema import TOP_K

from tests.helpers import MODEL, SERVER_START_S, start_server, stop_server, wait_up  # noqa: F401


def _images(stream, tmp_path: Path) -> list[Path]:
    imgs = stream.val_images("deconv")[:2] + stream.val_images("nnconv", "0_real")[:2]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    return [*imgs, bad]


def _post(port: int, payload: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_served_model_answers_like_lorax_predict(stream, registry, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    monkeypatch.setenv("LORAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    images = _images(stream, tmp_path)
    assert main(["predict", *map(str, images), "--model", MODEL, "--out", str(tmp_path / "p.json")]) == 0
    expected = pd.DataFrame(json.loads((tmp_path / "p.json").read_text()))
    assert list(expected["status"]) == ["ok"] * 4 + ["error"] and expected["unknown_score"][:4].notna().all()
    from mlflow import MlflowClient

    champion = MlflowClient(registry).get_model_version_by_alias("lorax-attributor", "champion").version
    assert list(expected["model_version"]) == [str(champion)] * 5  # the version the alias resolved to

    proc, port, log = start_server(MODEL, registry, tmp_path)
    try:
        wait_up(proc, port, log)
        payload = {"dataframe_split": {"columns": ["image", "name"],
                                       "data": [[base64.b64encode(p.read_bytes()).decode(), str(p)] for p in images]}}
        got = pd.DataFrame(_post(port, payload)["predictions"])
        # a malformed value is that row's error; the batch's other rows are still scored
        bad = _post(port, {"dataframe_split": {"columns": ["image"], "data": [
            ["neither a file nor base64!"], [base64.b64encode(images[0].read_bytes()).decode()]]}})["predictions"]
        assert [r["status"] for r in bad] == ["error", "ok"] and "not valid base64" in bad[0]["error"]
    finally:
        stop_server(proc)

    assert list(got.columns) == COLUMNS
    assert list(got["model_version"]) == [None] * 5  # `mlflow models serve` passes no model_config
    assert list(got["generators"]) == list(expected["generators"])  # the prediction sets: lists in the JSON answer
    for col in [c for c in COLUMNS if c not in ("top", "generators", "model_version")]:
        for a, b in zip(got[col], expected[col], strict=True):
            if pd.isna(b):
                assert pd.isna(a), col
            elif isinstance(b, float):
                assert a == pytest.approx(b, rel=1e-5, abs=1e-6), col
            else:
                assert a == b, col
    for a, b in zip(got["top"], expected["top"], strict=True):  # a real list of TOP_K entries in the JSON answer
        assert len(a) == TOP_K and [e and e["class"] for e in a] == [e and e["class"] for e in b]
        assert [e["probability"] for e in a if e] == pytest.approx([e["probability"] for e in b if e], rel=1e-5)


def test_saving_the_model_prints_no_signature_warning_and_it_loads(stream, tmp_path: Path) -> None:
    """No signature on purpose (bytes, base64 or paths in one column): MLflow's warning about it is dropped,
    nothing else it logs, and the saved folder loads and predicts."""
    import logging

    import mlflow.pyfunc

    from pipelines.serving.pyfunc import save_attributor

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger, handler = logging.getLogger("mlflow.pyfunc"), Keep(logging.DEBUG)
    logger.addHandler(handler)
    try:
        save_attributor(tmp_path / "model", stream.state)
        logger.warning("a later mlflow.pyfunc warning")  # the filter is gone after saving
    finally:
        logger.removeHandler(handler)
    assert not any("infer model signature" in m for m in records), records
    assert records[-1] == "a later mlflow.pyfunc warning"
    image = stream.val_images(stream.params.tasks[0])[0]
    out = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(pd.DataFrame({"image": [image.read_bytes()]}))
    assert out["top"].iloc[0][0]["class"].split("/")[0] in stream.params.tasks
    # a version registered before the split (its models-from-code file imports lorax.serving.pyfunc, which the
    # library no longer has) still predicts through `lorax predict --model`, which reads the artifacts directly
    from lorax.serving.load import predictor_for
    from pipelines.serving.download import resolve_local

    code = next((tmp_path / "model").rglob("pyfunc_model.py"))
    code.write_text(code.read_text().replace("from pipelines.serving.pyfunc import", "from lorax.serving.pyfunc import"))
    assert "from lorax.serving.pyfunc import LoraxAttributor" in code.read_text()
    old = predictor_for(resolve_local(str(tmp_path / "model")), openset=False).predict([image])
    row = old.table.iloc[0]
    assert row["status"] == "ok" and [e["class"] for e in row["top"]] == [e["class"] for e in out["top"].iloc[0]]


def test_the_loaded_model_reports_its_version_and_refuses_other_columns(stream, tmp_path: Path) -> None:
    """``model_config={"model_version": N}`` (what `lorax serve` passes) is every row's ``model_version``; a request
    whose columns are not ``image`` (and ``name``) is refused in one line naming the expected columns."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from pipelines.serving.pyfunc import save_attributor

    save_attributor(tmp_path / "model", stream.state)
    image = base64.b64encode(stream.val_images("deconv")[0].read_bytes()).decode()
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"), model_config={"model_version": 7})
    out = model.predict(pd.DataFrame({"image": [image, "bad base64!"], "name": ["a", "b"]}))
    assert list(out["model_version"]) == ["7", "7"] and list(out["status"]) == ["ok", "error"]
    assert list(model.predict([image])["status"]) == ["ok"]  # a plain list is still the image column
    for frame, got in ((pd.DataFrame({"img": [image]}), "['img']"), (pd.DataFrame({"foo": [1], "bar": [2]}),
                                                                     "['foo', 'bar']"),
                       (pd.DataFrame({"image": [image], "extra": [1]}), "['image', 'extra']")):
        with pytest.raises(MlflowException) as e:
            model.predict(frame)
        assert str(e.value.message) == ("expected columns 'image' (base64 of the image bytes) and optional 'name'; "
                                         f"got {got}")
        assert e.value.error_code == "INVALID_PARAMETER_VALUE"
