"""The row schema on forced decisions: what a person reads never contradicts itself."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lorax.continual.metrics import softmax
from lorax.serving.schema import TOP_K, decided_rows, read_csv, write_csv


def test_rows_are_readable_whatever_the_model_decides() -> None:
    """Forced decisions: a row never names a generator beside a real verdict or an unknown flag, ``top`` keeps its
    length when the model has fewer classes, and a state without a stored verdict shows the 0.5 it compares with."""
    classes = ["a/real", "a/fake"]
    probs = softmax(np.array([[0.0, 2.0], [1.0, 0.0], [0.0, 3.0]]))
    pred, rows = decided_rows(probs, classes, np.array([0.9, 0.2, 0.7]), 0.6, np.array([5.0, 5.0, 0.1]),
                              np.array([True, True, False]))
    assert rows["verdict"] == ["fake", "real", "fake"] and rows["threshold"] == [0.6] * 3
    assert rows["unknown"] == [True, False, False]  # over the open-set threshold but real: not unknown
    assert rows["generator"] == [None, None, "a"] and rows["generator_probability"] == [None, None, 1.0]
    assert all(len(top) == TOP_K and top[-1] is None for top in rows["top"])  # 2 classes, padded to 3
    assert rows["top"][2][0] == {"class": "a/fake", "probability": pytest.approx(probs[2, 1])}
    # the argmax rule (no stored verdict): 4 classes where summed fake probability and the argmax disagree
    probs = np.array([[0.3, 0.4, 0.3, 0.0], [0.24, 0.26, 0.24, 0.26]])
    pred, rows = decided_rows(probs, ["a/real", "a/fake", "b/real", "b/fake"], None, None)
    assert rows["threshold"] == [0.5, 0.5] and list(pred) == list(probs.argmax(axis=1))
    assert rows["verdict"] == ["fake", "fake"] and rows["generator"] == ["a", "a"]
    assert all((v == "fake") == (p >= 0.5) for v, p in zip(rows["verdict"], rows["fake_probability"], strict=True))
    assert rows["unknown"] == [None, None] and rows["unknown_score"] == [None, None]  # no calibration: not known


def test_csv_holds_top_as_json_and_reads_it_back(tmp_path) -> None:
    _, rows = decided_rows(softmax(np.array([[0.0, 1.0]])), ["a/real", "a/fake"], None, None)
    table = pd.DataFrame({"path": ["x"], "top": rows["top"]})
    write_csv(table, tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv")["top"][0].endswith("}, null]")
    assert read_csv(tmp_path / "t.csv")["top"][0] == rows["top"][0]
