"""Continual metrics on hand-made predictions and matrices; expected values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from lorax.continual import metrics as M
from lorax.continual.plots import plot_accuracy_matrix, plot_confusion, plot_task_curves

# targets: task 0 real x3, task 0 fake x2, task 1 fake x2
TARGET = np.array([0, 0, 0, 1, 1, 3, 3])
PRED = np.array([0, 2, 1, 1, 3, 3, 2])
# multi-real:  T  T(any real)  F  T  F(wrong generator)  T  F

# 3 tasks: columns are steps. AA = (90 + (80+95)/2 + (70+85+100)/3)/3 = (90+87.5+85)/3 = 87.5
# AAF = (70+85+100)/3 = 85; BWT = ((70-90) + (85-95))/2 = -15
R3 = np.array([[90.0, 80.0, 70.0], [np.nan, 95.0, 85.0], [np.nan, np.nan, 100.0]])


def test_multi_real_correct_and_accuracies():
    assert M.multi_real_correct(PRED, TARGET).tolist() == [True, True, False, True, False, True, False]
    assert M.task_accuracy(PRED, TARGET) == pytest.approx(100 * 4 / 7)
    # parity: target 0001111 vs pred 0011110 -> 5 of 7
    assert M.binary_accuracy(PRED, TARGET) == pytest.approx(100 * 5 / 7)


def test_accuracy_bad_input():
    with pytest.raises(ValueError, match="no images"):
        M.task_accuracy(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(ValueError, match="must match"):
        M.task_accuracy(np.array([0, 1]), np.array([0]))


def test_summary_of_hand_matrix():
    s = M.summarize(R3)
    assert s == pytest.approx({"aa": 87.5, "aaf": 85.0, "bwt": -15.0, "forgetting": 15.0})
    assert M.aa(R3) == pytest.approx(87.5) and M.forgetting(R3) == pytest.approx(15.0)


def test_single_task_and_positive_transfer():
    assert M.summarize([[80.0]]) == pytest.approx({"aa": 80.0, "aaf": 80.0, "bwt": 0.0, "forgetting": 0.0})
    R = np.array([[60.0, 70.0], [np.nan, 50.0]])  # old task improved: BWT = +10
    assert M.bwt(R) == pytest.approx(10.0) and M.forgetting(R) == pytest.approx(-10.0)
    assert M.aa(R) == pytest.approx((60 + 60) / 2)


def test_matrix_validation():
    bad = R3.copy()
    bad[1, 2] = np.nan  # a seen task not evaluated
    with pytest.raises(ValueError, match="non-finite"):
        M.aaf(bad)
    with pytest.raises(ValueError, match="square"):
        M.aa(np.ones((2, 3)))


def test_accuracy_matrix_grows_and_round_trips():
    am = M.AccuracyMatrix()
    am.add_step([90.0])
    am.add_step([80.0, 95.0])
    am.add_step([70.0, 85.0, 100.0])
    np.testing.assert_array_equal(am.values, R3)
    assert am.summary() == pytest.approx(M.summarize(R3))
    rows = am.to_list()
    assert rows[2][0] is None and rows[0][2] == 70.0
    np.testing.assert_array_equal(M.AccuracyMatrix.from_list(rows).values, R3)
    with pytest.raises(ValueError, match="tasks 0..3"):
        am.add_step([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        M.AccuracyMatrix().summary()


def test_confusion_matrix():
    cm = M.confusion_matrix(PRED, TARGET, 4)
    expected = np.zeros((4, 4), int)
    for t, p in zip(TARGET, PRED):
        expected[t, p] += 1
    np.testing.assert_array_equal(cm, expected)
    assert cm[0].tolist() == [1, 1, 1, 0] and cm[3].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="out of range"):
        M.confusion_matrix(PRED, TARGET, 3)


def test_per_task_ap():
    # task 0: scores of real 0.1, 0.4; fake 0.35, 0.8 -> ranking F(0.8) R(0.4) F(0.35) R(0.1):
    # AP = (1/1 + 2/3) / 2 = 83.33%. task 1: fake scored above real -> 100. task 2: only reals -> NaN.
    target = np.array([0, 0, 1, 1, 2, 3, 4])
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.5])
    ap = M.per_task_ap(score, target, n_tasks=4)
    assert ap[0] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert ap[1] == pytest.approx(100.0)
    assert math.isnan(ap[2]) and math.isnan(ap[3])  # one-sided task and task without images


def _logits_for(preds: list[int], n_cls: int) -> np.ndarray:
    lg = np.zeros((len(preds), n_cls))
    lg[np.arange(len(preds)), preds] = 5.0
    return lg


def test_evaluate_logits_by_hand():
    targets = np.array([0, 1, 2, 3, 4])
    tasks = np.array([0, 0, 1, 1, 2])  # the task-2 image is unseen after 2 tasks: ignored
    lg = _logits_for([2, 3, 1, 3, 4], 6)
    lg[0, 4] = 50.0  # class 4 is not seen yet: must not win
    out = M.evaluate_logits(lg, targets, tasks, n_tasks_seen=2)
    # preds over the first 4 classes: [2, 3, 1, 3]; multi-real: T F F T; binary: T T F T
    assert out["task_acc"] == pytest.approx([50.0, 50.0])
    assert out["mean_acc"] == pytest.approx(50.0)
    assert out["binary_acc"] == pytest.approx(75.0)
    assert out["binary_acc_per_task"] == pytest.approx([100.0, 50.0])
    assert out["n_images"] == [1 + 1, 2]
    assert out["confusion"] == [[0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1]]
    # task 0 fake prob: real image 0 -> p(1)+p(3) small, fake image 1 -> large: AP 100
    assert out["task_ap"][0] == pytest.approx(100.0)
    assert len(out["task_ap"]) == 2


def test_evaluate_logits_bad_input():
    lg = _logits_for([0, 1], 4)
    with pytest.raises(ValueError, match=r"task\(s\) \[1\] have no images"):
        M.evaluate_logits(lg, np.array([0, 1]), np.array([0, 0]), n_tasks_seen=2)
    with pytest.raises(ValueError, match="does not belong to task"):
        M.evaluate_logits(lg, np.array([0, 3]), np.array([0, 0]), n_tasks_seen=2)
    with pytest.raises(ValueError, match="need 6"):
        M.evaluate_logits(lg, np.array([0, 1]), np.array([0, 0]), n_tasks_seen=3)


def test_prediction_table():
    lg = np.array([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 0.0, 2.0]])
    from lorax.serving.schema import COLUMNS, EVAL_COLUMNS, TOP_K

    df = M.prediction_table(["a.png", "b.png"], lg, np.array([2, 1]), np.array([1, 0]), task_names=["x", "y"])
    assert list(df.columns) == COLUMNS + EVAL_COLUMNS  # lorax predict's row, then the evaluation's own columns
    assert df["verdict"].tolist() == ["real", "fake"] and df["generator"].fillna("-").tolist() == ["-", "y"]
    assert df["correct"].tolist() == [True, False]  # real as another real: ok; fake as wrong generator: not
    assert df["task"].tolist() == ["y", "x"] and df["target"].tolist() == ["y/real", "x/fake"]
    p = M.softmax(lg)
    # no stored verdict (argmax rule): the best fake class against the best real one, threshold 0.5
    np.testing.assert_allclose(df["fake_probability"], p[:, 1::2].max(1) / (p[:, 1::2].max(1) + p[:, 0::2].max(1)))
    assert ((df["verdict"] == "fake") == (df["fake_probability"] >= df["threshold"])).all()
    assert df["threshold"].tolist() == [0.5, 0.5] and df["status"].tolist() == ["ok", "ok"]
    assert [e["class"] for e in df["top"][0]] == ["x/real", "y/real", "x/fake"] and len(df["top"][1]) == TOP_K
    np.testing.assert_allclose([t[0]["probability"] for t in df["top"]], p.max(axis=1))


def _is_png(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 50
        im.verify()


def test_plots_write_valid_pngs(tmp_path):
    names = ["deconv", "nnconv", "bilinear"]
    _is_png(plot_accuracy_matrix(R3, names, tmp_path / "R.png"))
    _is_png(plot_task_curves(R3, names, tmp_path / "curves.png"))
    cm = M.confusion_matrix(PRED, TARGET, 6)
    _is_png(plot_confusion(cm, [f"{n}_{k}" for n in names for k in ("real", "fake")], tmp_path / "sub" / "cm.png"))
    with pytest.raises(ValueError, match="2 names for 3"):
        plot_accuracy_matrix(R3, names[:2], tmp_path / "bad.png")


def test_pooled_accuracy_weighs_every_image():
    # task 0: 4 images, 1 right; task 1: 1 image, right. Mean of tasks 62.5, pooled 2/5 = 40
    targets, tasks = np.array([0, 1, 1, 1, 3]), np.array([0, 0, 0, 0, 1])
    out = M.evaluate_logits(_logits_for([0, 3, 3, 3, 3], 4), targets, tasks, n_tasks_seen=2)
    assert out["mean_acc"] == pytest.approx(62.5)
    assert out["pooled_acc"] == pytest.approx(40.0)
    assert {"binary_acc_fitted", "binary_threshold", "binary_ap"} <= set(out)


def test_binary_decision_is_cross_fitted():
    # separable scores: every fold's threshold separates the other fold too
    score = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 0.95])
    fake = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    d = M.binary_decision(score, fake)
    assert d["binary_acc_fitted"] == pytest.approx(100.0) and d["binary_ap"] == pytest.approx(100.0)
    assert 0.3 < d["binary_threshold"] <= 0.6
    # interleaved classes: a threshold fitted on these 4 images and scored on them claims 75%; cross-fitted, each
    # half is scored with the other half's threshold: 50%, the honest figure for scores that carry no signal
    score2, fake2 = np.array([0.3, 0.5, 0.4, 0.6]), np.array([0, 0, 1, 1])
    t_all = M.binary_decision(score2, fake2)["binary_threshold"]
    assert np.mean((score2 >= t_all) == (fake2 == 1)) == pytest.approx(0.75)
    assert M.binary_decision(score2, fake2)["binary_acc_fitted"] == pytest.approx(50.0)
    # only fakes: AP undefined (NaN)
    assert math.isnan(M.binary_decision(np.array([0.7, 0.8]), np.array([1, 1]))["binary_ap"])
    with pytest.raises(ValueError, match="binary_decision"):
        M.binary_decision(np.array([0.5]), np.array([1, 0]))
