"""benchmarks/head_kinds.py: every head kind scores curved and straight borders as it should on synthetic features,
and on a tiny stream the logistic head fitted on the state's own rows reproduces the state."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.head_kinds import evaluate_heads, head_kinds, main, pooled


def _rings(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 (fake of task 0) inside a ring of class 0 (real): no straight border separates them."""
    r = np.where(np.arange(n) % 2 == 0, 3.0, 1.0) + rng.normal(0, 0.2, n)
    a = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([r * np.cos(a), r * np.sin(a), rng.normal(0, 1, n)], 1)
    return x, (np.arange(n) % 2).astype(np.int64)


def test_curved_borders_need_a_curved_head():
    rng = np.random.default_rng(0)
    x, y = _rings(300, rng)
    xv, yv = _rings(200, rng)
    head_rows = np.arange(300) < 150
    res = evaluate_heads(head_kinds(), (x, y, np.arange(300) % 3, head_rows), (xv, yv), (x[:150], y[:150]), k=2)
    assert set(res) == {"logistic", "lda", "svm", "mlp", "knn"}
    assert res["svm"]["cv"] > 95 and res["svm"]["joint"] > 95 and res["mlp"]["joint"] > 95
    assert max(res["logistic"]["cv"], res["lda"]["cv"], res["logistic"]["joint"], res["lda"]["joint"]) < 75  # a line
    assert res["knn"]["joint"] < 80  # cosine kNN sees directions only: the rings' radii are lost on it
    assert len(res["mlp"]["cv_folds"]) == len(res["svm"]["cv_memory_folds"]) == 3
    assert res["svm"]["cv_memory"] > 95 and res["logistic"]["cv_memory"] < 75


def test_pooled_counts_any_real_class_as_right_for_a_real_image():
    scores = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)  # real->real of task 1; fake right; wrong
    assert pooled(scores, np.array([0, 1, 1])) == pytest.approx(200 / 3, abs=0.01)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Only one sample available")  # LDA on a tiny fold: a class with one row
def test_the_logistic_head_on_the_states_own_rows_reproduces_the_state(tmp_path):
    from benchmarks.head_memory import head_memory
    from pipelines.train_stream import run_stream
    from tests.helpers import PARAMS_YAML, TINY_OVERRIDES, prepared_zoo, tiny_params

    params = tiny_params(tmp_path, continual__head="refit")
    manifests = prepared_zoo(tmp_path, params)
    run_stream(params, params.data.manifests, tmp_path / "run")
    state = head_memory(tmp_path / "run", manifests, params.cache, per_class=[])["state"]["pooled"]
    sets = [f"{k}={v!r}".replace("'", '"').replace("None", "null") for k, v in TINY_OVERRIDES.items()]
    argv = ["--params", str(PARAMS_YAML), "--run", str(tmp_path / "run"), "--manifests", params.data.manifests,
            "--data", params.data.root, "--folds", "2", "--heads", "logistic", "lda", "--out", str(tmp_path / "o"),
            "-S", f"cache.dir={params.cache.dir}", *[x for s in sets for x in ("-S", s)]]
    assert main(argv) == 0
    import json

    res = json.loads((tmp_path / "o" / "head_kinds.json").read_text())
    assert set(res) == {"logistic", "lda"}
    assert res["logistic"]["memory"] == pytest.approx(state, abs=1e-9)
    assert "| lda |" in (tmp_path / "o" / "head_kinds.md").read_text()
