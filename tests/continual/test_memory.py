"""Exemplar memory on hand-made features; herding orders computed by hand in the comments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lorax.continual.memory import (ExemplarMemory, _class_seed, calibration_draw, closest_to_mean, herding,
                                   per_class_budget, random_select, split_budget)
from lorax.data.manifest import MANIFEST_COLUMNS

# 1-D: normalised to [+1, -1, +1, +1, -1], class mean 0.2. Step k picks argmin |0.2 - (S + x)/k|:
# k=1: +1 -> 0.8, -1 -> 1.2: idx 0 | k=2 (S=1): +1 -> 0.8, -1 -> 0.2: idx 1 | k=3 (S=0): +1 -> 0.13: idx 2
# k=4 (S=1): +1 -> 0.3, -1 -> 0.2: idx 4 | k=5: idx 3
F1 = np.array([[3.0], [-1.0], [2.0], [5.0], [-4.0]])
H1 = [0, 1, 2, 4, 3]

# 2-D: normalised e1, e2, -e2, e1, e2, -e1; mean (1/6, 1/6).
# k=1: e1 and e2 tie (26/36) -> idx 0 | k=2 (S=e1): -e1 gives mean 0 -> 2/36, best: idx 5
# k=3 (S=0): e1 and e2 tie (2/36) -> lowest free: idx 1 | k=4 (S=e2): +e1 -> (1/4,1/4), 2/144: idx 3
# k=5 (S=e1+e2): -e2 -> (1/5, 0), 26/900 < +e2 50/900: idx 2 | k=6: idx 4
F2 = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [4.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
H2 = [0, 5, 1, 3, 2, 4]


def test_herding_by_hand():
    assert herding(F1, 5).tolist() == H1
    assert herding(F2, 6).tolist() == H2
    assert herding(F2, 3).tolist() == H2[:3]  # every prefix is the herding answer for that budget
    assert herding(F2, 100).tolist() == H2  # fewer samples than asked: all, no repeats
    assert herding(F2, 0).tolist() == []
    assert herding(np.ones((4, 3)), 4).tolist() == [0, 1, 2, 3]  # duplicates: no repeats, lowest index first


def test_closest_to_mean_and_random():
    # normalised e1, e2, e2, -e1: mean (0, 0.5); distances^2 1.25, .25, .25, 1.25 -> 1, 2, then 0
    f = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [-3.0, 0.0]])
    assert closest_to_mean(f, 3).tolist() == [1, 2, 0]
    a, b = random_select(50, 10, seed=3), random_select(50, 10, seed=3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10 and a.max() < 50
    assert random_select(50, 10, seed=4).tolist() != a.tolist()
    assert sorted(random_select(4, 10, seed=0).tolist()) == [0, 1, 2, 3]


def test_bad_selection_input():
    with pytest.raises(ValueError, match="2-D"):
        herding(np.ones(4), 2)
    with pytest.raises(ValueError, match=">= 0"):
        herding(F2, -1)


@pytest.mark.parametrize(
    ("memory", "n_classes", "mode", "per_class", "expected"),
    [
        (500, 2, "fixed_total", 0, 250),
        (500, 3, "fixed_total", 0, 166),
        (500, 6, "fixed_total", 0, 83),
        (500, 14, "fixed_total", 0, 35),
        (1500, 24, "fixed_total", 0, 62),
        (8, 10, "fixed_total", 0, 0),
        (0, 4, "fixed_total", 0, 0),
        (500, 2, "fixed_per_class", 20, 20),
        (500, 14, "fixed_per_class", 20, 20),
        (500, 14, "fixed_per_class", 0, 0),
    ],
)
def test_per_class_budget(memory, n_classes, mode, per_class, expected):
    assert per_class_budget(memory, n_classes, mode, per_class) == expected


def test_budget_bad_input():
    with pytest.raises(ValueError, match="memory_mode"):
        per_class_budget(500, 2, "growing")
    with pytest.raises(ValueError, match="n_classes"):
        per_class_budget(500, 0)


def _rows(task_index: int, n_real: int, n_fake: int) -> pd.DataFrame:
    recs = []
    for label, n in ((0, n_real), (1, n_fake)):
        for k in range(n):
            recs.append({
                "root": "/data", "path": f"t{task_index}/{label}/{k:03d}.png", "task": f"t{task_index}",
                "task_index": task_index, "split": "train", "label": label, "class_id": 2 * task_index + label,
                "subclass": "", "sha256": f"{task_index}{label}{k:062d}", "width": 8, "height": 8, "mode": "RGB",
            })
    return pd.DataFrame(recs, columns=MANIFEST_COLUMNS)


def test_memory_add_shrink_keeps_herding_prefix():
    rows = _rows(0, 6, 5)  # class 0: F2 (6 samples), class 1: F1 (5 samples)
    feats = np.zeros((11, 2))
    feats[:6] = F2
    feats[6:, 0] = F1[:, 0]
    mem = ExemplarMemory()
    mem.add_classes(rows, feats, "herding", budget=4)
    assert mem.class_counts() == {0: 4, 1: 4} and len(mem) == 8
    r = mem.rows()
    assert r.loc[r.class_id == 0, "path"].tolist() == [f"t0/0/{k:03d}.png" for k in H2[:4]]
    assert r.loc[r.class_id == 1, "path"].tolist() == [f"t0/1/{k:03d}.png" for k in H1[:4]]
    assert r.loc[r.class_id == 0, "rank"].tolist() == [0, 1, 2, 3]
    assert list(mem.manifest().columns) == [*MANIFEST_COLUMNS, "calib"]  # the prediction sets read the kind

    # new task: 3 samples per class, budget 10 -> a class with fewer samples keeps all of them
    mem.shrink(2)
    mem.add_classes(_rows(1, 3, 3), np.eye(6, 3) + 0.1, "herding", budget=10)
    assert mem.class_counts() == {0: 2, 1: 2, 2: 3, 3: 3}
    r = mem.rows()
    assert r.loc[r.class_id == 0, "path"].tolist() == [f"t0/0/{k:03d}.png" for k in H2[:2]]
    mem.shrink(0)
    assert len(mem) == 0


def test_memory_is_deterministic_and_order_free():
    rng = np.random.default_rng(0)
    rows, feats = _rows(0, 20, 20), rng.normal(size=(40, 5))
    for method in ("herding", "closest", "random"):
        a, b, c = ExemplarMemory(), ExemplarMemory(), ExemplarMemory()
        a.add_classes(rows, feats, method, budget=7, seed=1)
        b.add_classes(rows, feats, method, budget=7, seed=1)
        perm = rng.permutation(40)  # rows gathered in another order (e.g. from other processes)
        c.add_classes(rows.iloc[perm], feats[perm], method, budget=7, seed=1)
        pd.testing.assert_frame_equal(a.rows(), b.rows())
        pd.testing.assert_frame_equal(a.rows(), c.rows())
    d = ExemplarMemory()
    d.add_classes(rows, feats, "random", budget=7, seed=2)
    assert d.rows()["path"].tolist() != a.rows()["path"].tolist()


def test_memory_bad_input_and_round_trip(tmp_path):
    rows = _rows(0, 4, 4)
    mem = ExemplarMemory()
    with pytest.raises(ValueError, match=r"features \(7, 2\)"):
        mem.add_classes(rows, np.ones((7, 2)), "herding", budget=2)
    with pytest.raises(ValueError, match="unknown method"):
        mem.add_classes(rows, np.ones((8, 2)), "kmeans", budget=2)
    mem.add_classes(rows, np.arange(16.0).reshape(8, 2), "herding", budget=2)
    with pytest.raises(ValueError, match=r"classes \[0, 1\] are already in memory"):
        mem.add_classes(rows, np.ones((8, 2)), "herding", budget=2)
    path = mem.save(tmp_path / "state" / "memory.parquet")
    back = ExemplarMemory.load(path)
    pd.testing.assert_frame_equal(back.rows(), mem.rows())
    assert back.class_counts() == {0: 2, 1: 2}
    with pytest.raises(FileNotFoundError, match="exemplar memory not found"):
        ExemplarMemory.load(tmp_path / "nope.parquet")


def test_calibration_share_draws_at_random_and_the_reduction_keeps_its_share():
    rng = np.random.default_rng(0)
    rows, feats = _rows(0, 100, 100), rng.normal(size=(200, 5))
    mem = ExemplarMemory()
    mem.add_classes(rows, feats, "herding", budget=50, seed=3, calibration_share=0.3)
    assert mem.class_counts() == {0: 50, 1: 50} and mem.calib_counts() == {0: 15, 1: 15}
    r = mem.rows()
    first = r[r.class_id == 0]
    cal0 = first.loc[first.calib, "path"].tolist()
    assert not set(cal0) & set(first.loc[~first.calib, "path"])  # the two kinds are disjoint
    # the calibration rows are the seeded random draw (in draw order), not herding's picks
    assert first.loc[first.calib, "rank"].tolist() == list(range(15))
    canonical = sorted(rows.loc[rows.class_id == 0, "path"])
    assert cal0 == [canonical[i] for i in calibration_draw(100, 50, 0.3, _class_seed(3, 0))]
    # the other slots are herding's answer on the rows left after the draw
    rest = [i for i in range(100) if i not in set(calibration_draw(100, 50, 0.3, _class_seed(3, 0)))]
    feats0 = feats[:100][np.argsort(rows.loc[rows.class_id == 0, "path"].to_numpy(), kind="stable")]
    assert first.loc[~first.calib, "path"].tolist() == [canonical[rest[i]] for i in herding(feats0[rest], 35)]

    for budget, n_cal in ((20, 6), (7, 2), (3, 1)):  # round(20 * 15/50) = 6, round(7 * 6/20) = 2, round(3 * 2/7) = 1
        before = mem.rows()
        mem.shrink(budget)
        after = mem.rows()
        assert mem.class_counts() == {0: budget, 1: budget} and mem.calib_counts() == {0: n_cal, 1: n_cal}
        for c in (0, 1):
            b, a = before[before.class_id == c], after[after.class_id == c]
            # each kind keeps a prefix of its order: the random rows a prefix of their draw (still a random subset
            # of the earlier random rows), the herded ones the iCaRL reduction
            assert a.loc[a.calib, "path"].tolist() == b.loc[b.calib, "path"].tolist()[:n_cal]
            assert a.loc[~a.calib, "path"].tolist() == b.loc[~b.calib, "path"].tolist()[:budget - n_cal]


def test_split_budget_and_bad_share():
    assert split_budget(20, 15, 35) == (6, 14)
    assert split_budget(60, 15, 35) == (15, 35)  # more room than rows: all kept
    assert split_budget(10, 0, 35) == (0, 10)  # an old table: all selected rows, the plain reduction
    assert split_budget(10, 8, 2) == (8, 2)  # round(10 * 8 / 10): nothing to cut
    assert split_budget(4, 1, 1) == (1, 1)
    assert len(calibration_draw(10, 50, 0.3, 0)) == 3  # a class smaller than its slots: the share of its rows
    assert len(calibration_draw(100, 50, 0.0, 0)) == 0
    with pytest.raises(ValueError, match=r"continual.calibration_share must be in \[0, 1\)"):
        calibration_draw(100, 50, 1.0, 0)


def test_a_memory_table_without_the_calib_column_loads_as_all_selected(tmp_path):
    rows = _rows(0, 6, 5)
    mem = ExemplarMemory()
    mem.add_classes(rows, np.arange(22.0).reshape(11, 2), "herding", budget=4)
    old = tmp_path / "old.parquet"
    mem.rows().drop(columns=["calib"]).to_parquet(old, index=False)  # as saved before the column existed
    back = ExemplarMemory.load(old)
    assert back.rows()["calib"].dtype == bool and not back.rows()["calib"].any()
    assert back.calib_counts() == {0: 0, 1: 0}
    pd.testing.assert_frame_equal(back.rows(), mem.rows())
    back.shrink(2)  # the plain iCaRL reduction
    assert back.rows()["rank"].tolist() == [0, 1, 0, 1]
    back.add_classes(_rows(1, 3, 3), np.eye(6, 3) + 0.1, "herding", budget=2, calibration_share=0.5)
    assert back.calib_counts() == {0: 0, 1: 0, 2: 1, 3: 1}
