"""`lorax predict --model models:/...`: a registered model resolved in the MLflow registry, and the clear errors when
the registry is down, missing, or does not hold the name (:mod:`pipelines.serving.download`)."""

from __future__ import annotations

import socket
from pathlib import Path

from pipelines.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registry_down_or_missing(stream, tmp_path: Path, capsys, monkeypatch) -> None:
    img = str(stream.val_images("deconv")[0])
    out = str(tmp_path / "p.csv")
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the registry comes from MLFLOW_TRACKING_URI or the default

    port = _closed_port()  # a registry that is down
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert main(["predict", img, "--model", "models:/lorax-attributor@champion", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "registry is not available" in err and f"127.0.0.1:{port}" in err and "not reachable" in err

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")  # no store at all
    assert main(["predict", img, "--model", "models:/lorax-attributor@champion", "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert not Path(out).exists()


def test_model_uri_not_in_the_registry(stream, registry, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    monkeypatch.setenv("LORAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    img = str(stream.val_images("deconv")[0])
    for uri in ("models:/no-such-model@champion", "models:/lorax-attributor@no-such-alias",
                "models:/lorax-attributor/99"):
        assert main(["predict", img, "--model", uri, "--out", str(tmp_path / "p.csv")]) == 2
        err = capsys.readouterr().err
        assert "not found in the registry" in err and "Registered models: lorax-attributor" in err, err
    assert not (tmp_path / "p.csv").exists()
