"""The real/fake verdict: fitted on training rows only, cross-fitted threshold, one decision rule, stored with the state."""

from __future__ import annotations

import numpy as np
import pytest

from lorax.continual import metrics as M
from lorax.continual.verdict import Verdict, decide, fit_verdict


def _blobs(n_real: int, n_fake: int, d: int = 20, shift: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_real + n_fake, d))
    y = np.r_[np.zeros(n_real, int), np.ones(n_fake, int)]
    x[y == 1, :3] += shift
    return x, y


def test_fit_verdict_balanced_and_cross_fitted() -> None:
    """Few reals among many fakes: the class-balanced head and the balanced-accuracy threshold still call most
    held-out reals real (a plain accuracy threshold would drift towards calling everything fake)."""
    x, y = _blobs(60, 240)
    v = fit_verdict(x, y)
    assert v.info["c"] in (0.01, 0.1, 1.0, 10.0) and v.info["rows"] == 300 and v.info["folds"] == 5
    assert v.info["oof_balanced_acc"] > 80
    xt, yt = _blobs(500, 500, seed=1)
    p = v.fake_probability(xt)
    called = p >= v.threshold
    real_ok, fake_ok = (~called[yt == 0]).mean(), called[yt == 1].mean()
    assert real_ok > 0.8 and fake_ok > 0.8, (real_ok, fake_ok)
    # calibrated to equal priors: on a balanced set the mean probability of fakes and reals straddle 0.5
    assert p[yt == 1].mean() > 0.6 and p[yt == 0].mean() < 0.4


def test_fit_verdict_needs_both_kinds() -> None:
    x, y = _blobs(0, 30)
    with pytest.raises(ValueError, match="real and fake"):
        fit_verdict(x, y)


def test_groups_never_split_across_folds() -> None:
    x, y = _blobs(40, 40)
    groups = np.repeat(np.arange(20), 4)
    from lorax.continual.verdict import _folds

    fold = _folds(y, groups, 5)
    for g in range(20):
        assert len(set(fold[groups == g])) == 1


def test_decide_names_a_generator_only_when_fake() -> None:
    probs = np.array([[0.1, 0.4, 0.2, 0.3],   # argmax: task 0 fake
                      [0.5, 0.1, 0.3, 0.1]])  # argmax: task 0 real
    assert decide(probs, None, None).tolist() == [1, 0]
    # the verdict decides the kind; the class is the best one of that kind
    assert decide(probs, np.array([0.2, 0.9]), 0.5).tolist() == [2, 1]
    assert decide(probs, np.array([0.7, 0.1]), 0.5).tolist() == [1, 0]


def test_evaluate_logits_with_verdict() -> None:
    logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.1, 0.3, 0.1], [0.3, 0.2, 0.2, 0.3]]))
    targets, tasks = np.array([0, 1, 3]), np.array([0, 0, 1])
    plain = M.evaluate_logits(logits, targets, tasks, 2)
    assert plain["verdict_threshold"] is None and plain["pooled_acc"] == plain["pooled_acc_argmax"]
    out = M.evaluate_logits(logits, targets, tasks, 2, fake_score=np.array([0.2, 0.9, 0.8]), threshold=0.5)
    # row 0 real (called real: class 2 = task 1 real, multi-real correct), row 1 fake -> best fake class 1 (correct),
    # row 2 fake -> best fake class 3 (correct)
    assert out["pooled_acc"] == pytest.approx(100.0) and out["real_acc"] == 100.0 and out["fake_acc"] == 100.0
    assert out["balanced_acc"] == 100.0 and out["verdict_threshold"] == 0.5
    assert out["pooled_acc_argmax"] == 0.0  # the argmax gets every row wrong here
    table = M.prediction_table(["a", "b", "c"], logits, targets, tasks, fake_score=np.array([0.2, 0.9, 0.8]),
                               threshold=0.5)
    assert table["verdict"].tolist() == ["real", "fake", "fake"] and table["threshold"].tolist() == [0.5] * 3
    assert table["generator"].fillna("-").tolist() == ["-", "0", "1"] and table["fake_probability"].tolist() == [0.2, 0.9, 0.8]
    assert table["top"][0][0]["class"] == "0/fake"  # the most probable class, whatever the verdict (real here)


def test_save_and_load_roundtrip(tmp_path) -> None:
    x, y = _blobs(30, 30)
    v = fit_verdict(x, y)
    entry = v.save(tmp_path)
    back = Verdict.load(tmp_path, entry)
    assert back is not None and back.threshold == pytest.approx(v.threshold)
    np.testing.assert_allclose(back.fake_probability(x), v.fake_probability(x), rtol=1e-5)
    assert Verdict.load(tmp_path, None) is None and Verdict.load(tmp_path / "none", entry) is None


def test_row_groups_from_the_datasets_manifest(tmp_path) -> None:
    """Crops of one photo share the dataset's group (its manifest.csv); files it does not name are their own."""
    import pandas as pd

    from lorax.data.groups import row_groups

    (tmp_path / "manifest.csv").write_text("path,group\na/train/0_real/x_0.png,photo:7\na/train/0_real/x_1.png,photo:7\n")
    rows = pd.DataFrame({"root": str(tmp_path), "path": ["a/train/0_real/x_0.png", "a/train/0_real/x_1.png",
                                                         "a/train/1_fake/y.png"]})
    g = row_groups(rows)
    assert g[0] == g[1] == "photo:7" and g[2] != g[0] and g[2].endswith("y.png")
    no_file = pd.DataFrame({"root": str(tmp_path / "elsewhere"), "path": ["p.png", "q.png"]})
    assert len(set(row_groups(no_file))) == 2
