"""Model card: markdown + PNGs from a state and its metrics (or the evaluations saved next to it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorax.continual.summary import read_metrics
from pipelines.cli import main
from pipelines.serving.card import write_model_card


def _metrics(stream) -> dict:
    return read_metrics(stream.out / "metrics.json")  # with metrics_details.json: the matrix, final_task_acc


def test_card_from_stream_metrics(stream, tmp_path: Path) -> None:
    m = _metrics(stream)
    path = write_model_card(stream.state, m, tmp_path / "card")
    md = path.read_text()
    assert path.name == "model_card.md" and "after task `nnconv` (2 tasks)" in md
    assert "deconv, nnconv" in md and f"| AAF (average accuracy after the last task) | {m['aaf']:.2f} |" in md
    assert f"| BWT (backward transfer) | {m['bwt']:.2f} |" in md
    for png in ("acc_matrix.png", "confusion.png"):
        assert f"]({png})" in md
        with Image.open(tmp_path / "card" / png) as im:
            assert im.size[0] > 100
    # failure cases: tasks ordered by accuracy after the last task, lowest first
    acc = m["final_task_acc"]
    failures = md.split("## Known failure cases")[1].split("##")[0]
    named = re.findall(r"- \*\*(\w+)\*\*: ([\d.]+)%", failures)
    assert [t for t, _ in named] == [m["tasks"][i] for i in np.argsort(acc, kind="stable")]
    assert float(named[0][1]) == pytest.approx(min(acc), abs=0.05)
    assert "Open-set score calibrated: threshold" in md and "NO pretrained weights" in md


def test_card_without_metrics_uses_saved_evaluations(stream, tmp_path: Path) -> None:
    """At registration time there is no stream summary yet: the matrix comes from OUT/eval/<task>.json."""
    m = _metrics(stream)
    md = write_model_card(stream.state, {}, tmp_path / "card").read_text()
    assert f"| AA (average incremental accuracy) | {m['aa']:.2f} |" in md
    assert (tmp_path / "card" / "acc_matrix.png").is_file() and (tmp_path / "card" / "confusion.png").is_file()
    first = write_model_card(stream.out / "state" / "deconv", None, tmp_path / "first").read_text()
    assert "after task `deconv` (1 task)" in first and "| BWT (backward transfer) | 0.00 |" in first
    with pytest.raises(ValueError, match=r"metrics are for tasks \['deconv', 'nnconv'\]"):
        write_model_card(stream.out / "state" / "deconv", m, tmp_path / "bad")


def test_cli_card(stream, tmp_path: Path, capsys) -> None:
    assert main(["card", str(stream.state), "--out", str(tmp_path / "c")]) == 0
    assert "model card:" in capsys.readouterr().out and (tmp_path / "c" / "model_card.md").is_file()
    assert main(["card", str(stream.state), "--metrics", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "--metrics" in capsys.readouterr().err
    assert main(["card", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert "not a lorax state" in capsys.readouterr().err
