"""Open-set score (Mahalanobis with a shared covariance), its stored calibration, clustering and `lorax scan`."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from pipelines.cli import main
from lorax.serving.errors import ServingError
from lorax.serving.openset import (
    CalibrationError,
    OpenSetStats,
    fit,
    load_openset,
    openset_dir,
    set_threshold,
)
from lorax.serving.predict import Predictor
from lorax.serving.scan import cluster, scan_inbox
from lorax.serving.schema import read_csv


def _blobs(rng, means: np.ndarray, n: int, scale: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([m + scale * rng.standard_normal((n, means.shape[1])) for m in means])
    return x, np.repeat(np.arange(len(means)), n)


def test_score_is_min_class_mahalanobis_and_threshold_is_the_val_quantile() -> None:
    rng = np.random.default_rng(0)
    means = 3 * rng.standard_normal((4, 12))
    x, y = _blobs(rng, means, 60)
    stats = fit(x, y, 4)
    assert stats.meta["dim"] == 12  # narrow features: no projection
    # reference: the textbook formula on the same normalised features
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    mu = np.stack([xn[y == c].mean(0) for c in range(4)])
    prec = np.linalg.inv(LedoitWolf(assume_centered=True).fit(xn - mu[y]).covariance_)
    q = rng.standard_normal((7, 12)) * 2
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    ref = np.min([np.einsum("nd,de,ne->n", qn - m, prec, qn - m) for m in mu], axis=0) / 12
    np.testing.assert_allclose(stats.score(q), ref, rtol=1e-6)

    val, _ = _blobs(rng, means, 50)
    set_threshold(stats, val, 0.95)
    assert stats.threshold == pytest.approx(np.quantile(stats.score(val), 0.95))
    assert 0.03 <= (stats.score(val) > stats.threshold).mean() <= 0.06
    novel, _ = _blobs(rng, 3 * rng.standard_normal((1, 12)), 50)
    assert (stats.score(novel) > stats.threshold).mean() > 0.9


def test_wide_features_are_projected_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, y = _blobs(rng, rng.standard_normal((2, 400)), 40)
    stats = set_threshold(fit(x, y, 2), x[:20])
    assert stats.meta["dim"] == 78 and stats.transform.shape == (400, 78)  # n - classes directions
    stats.meta["require_fake"] = True
    back = OpenSetStats.load(stats.save(tmp_path / "os"))
    np.testing.assert_allclose(back.score(x), stats.score(x), rtol=1e-4)
    assert back.threshold == pytest.approx(stats.threshold) and back.meta["require_fake"] is True
    s = np.array([stats.threshold + 1, stats.threshold + 1, 0.0])
    assert back.flag(s, np.array([0.9, 0.1, 0.9]) >= 0.5).tolist() == [True, False, False]
    with pytest.raises(CalibrationError, match="width 5 do not match"):
        back.score(np.ones((1, 5)))
    with pytest.raises(CalibrationError, match=r"classes \[2\] have no train images"):
        fit(x, y, 3)


def test_calibration_belongs_to_its_state(stream, tmp_path: Path, caplog) -> None:
    assert load_openset(stream.state) is not None
    meta = json.loads((openset_dir(stream.state) / "openset.json").read_text())
    assert meta["tasks"] == ["deconv", "nnconv"] and meta["n_val"] == 2 * 2 * 6 and meta["quantile"] == 0.95
    other = tmp_path / "nnconv"
    shutil.copytree(stream.state, other)
    shutil.copytree(openset_dir(stream.state), openset_dir(other))
    assert load_openset(other) is not None  # same files: same fingerprint
    info = json.loads((other / "state.json").read_text())
    info["saved_at"] = "retrained"
    (other / "state.json").write_text(json.dumps(info))
    assert load_openset(other) is None and "made for another state" in caplog.text
    shutil.rmtree(openset_dir(other))
    assert load_openset(other) is None and "lorax calibrate" in caplog.text


def test_cluster_picks_the_number_of_groups() -> None:
    rng = np.random.default_rng(2)
    x, y = _blobs(rng, np.array([[0.0, 0, 0], [8, 0, 0], [0, 8, 0]]), 15, scale=0.5)
    labels, note = cluster(x)
    assert note["k"] == 3 and len(note["silhouette"]) == 7
    # the same partition as the truth (up to renaming)
    assert all(len(set(labels[y == c])) == 1 for c in range(3)) and len(set(labels)) == 3
    one, note1 = cluster(rng.standard_normal((40, 3)))
    assert note1["k"] == 1 and set(one) == {0}
    few, note2 = cluster(x[:5], min_group=3)
    assert note2["k"] == 1 and note2["silhouette"] == {}
    sizes = np.bincount(cluster(np.concatenate([x[:30], x[30:33]]), min_group=2)[0])
    assert list(sizes) == sorted(sizes, reverse=True)  # largest group first


def test_scan_writes_candidate_tasks(stream, predictor, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in stream.val_images("deconv")[:4] + stream.val_images("nnconv")[:4]:
        shutil.copy(p, inbox / p.name)
    (inbox / "broken.png").write_text("x")
    everything = Predictor(predictor.method, predictor.info, "cpu", openset=copy.deepcopy(predictor.openset))
    everything.openset.threshold = -1.0  # flag every image, to exercise grouping and copying
    out = tmp_path / "scan"
    s = scan_inbox(everything, [inbox], out, min_group=2)
    rows = read_csv(out / "predictions.csv")
    rows["unknown"] = rows["unknown"].fillna(False).astype(bool)
    n_fake = int((rows["verdict"] == "fake").sum())  # every image is over the threshold; only fakes are unknown
    assert s["n_images"] == 9 and s["n_errors"] == 1 and s["n_flagged"] == n_fake >= 4
    assert rows["unknown"].tolist() == (rows["verdict"] == "fake").tolist()
    assert rows.loc[rows["unknown"], "generator"].isna().all()  # unknown: no generator named
    members = [m for c in s["candidates"] for m in c["members"]]
    assert len(members) + len(s["ungrouped"]) == n_fake and s["candidates"]
    for c in s["candidates"]:
        files = sorted((out / c["name"] / "train" / "1_fake").iterdir())
        assert len(files) == c["n_images"] >= 2
        readme = (out / c["name"] / "README.md").read_text()
        for m in c["members"]:
            assert (out / m["file"]).read_bytes() == Path(m["source"]).read_bytes()
            assert Path(m["file"]).name in readme
    assert json.loads((out / "scan.json").read_text())["n_flagged"] == n_fake
    assert len((out / "predictions.csv").read_text().splitlines()) == 10
    with pytest.raises(ServingError, match="not empty.*--overwrite"):
        scan_inbox(everything, [inbox], out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ServingError, match="not empty; choose a new --out folder$"):
        scan_inbox(everything, [inbox], tmp_path / "other", overwrite=True)
    uncalibrated = Predictor(predictor.method, predictor.info, "cpu", openset=None)
    with pytest.raises(ServingError, match="no open-set calibration"):
        scan_inbox(uncalibrated, [inbox], tmp_path / "new")


def test_cli_scan(stream, tmp_path: Path, capsys) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in stream.val_images("nnconv")[:3]:
        shutil.copy(p, inbox / p.name)
    out = tmp_path / "scan"
    assert main(["scan", str(inbox), "--model", str(stream.state), "--out", str(out)]) == 0
    assert "3 images, 0 unreadable" in capsys.readouterr().out
    s = json.loads((out / "scan.json").read_text())
    assert s["n_images"] == 3 and s["threshold"] == pytest.approx(load_openset(stream.state).threshold)
    assert main(["scan", str(inbox), "--model", str(stream.state), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["scan", str(tmp_path / "empty"), "--model", str(stream.state), "--out", str(tmp_path / "s2")]) == 2
    assert "no images" in capsys.readouterr().err


def test_heldout_evaluation(stream, predictor, tmp_path: Path) -> None:
    from lorax.data.manifest import load_stream_manifests, read_manifest
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks
    from lorax.serving.scan import evaluate_heldout

    p = stream.params
    synth_tasks(["pixshuf"], tmp_path / "zoo", p.zoo)
    prepare_tasks(tmp_path / "zoo", ["pixshuf"], tmp_path / "held", p.data, p.model.img_size)
    known = load_stream_manifests(stream.manifests, predictor.tasks)
    fresh = Predictor(predictor.method, predictor.info, "cpu", openset=None)
    r = evaluate_heldout(fresh, known, {"pixshuf": read_manifest(tmp_path / "held" / "pixshuf.parquet")},
                         tmp_path / "eval")
    assert r["n_known_test"] == 12 and fresh.openset.meta["n_val"] == 12  # val split in half
    g = r["generators"]["pixshuf"]
    assert g["n_fakes"] == 18 and set(g["auroc"]) == {"mahalanobis", "energy", "msp"}
    assert all(0 <= a <= 1 for a in g["auroc"].values())
    assert g["share_in_one_group"] * 18 == pytest.approx(round(g["share_in_one_group"] * 18))
    assert g["share_in_one_group"] * 18 <= g["scan_flagged"]
    assert json.loads((tmp_path / "eval" / "heldout.json").read_text())["generators"]["pixshuf"] == g
    assert (tmp_path / "eval" / "pixshuf" / "scan.json").is_file()


def test_cli_calibrate(stream, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cal"
    assert main(["calibrate", str(stream.state), "--manifests", str(stream.manifests), "--out", str(out),
                 "--require-fake"]) == 0
    assert "open-set threshold" in capsys.readouterr().out
    stats = OpenSetStats.load(out)
    ref = load_openset(stream.state)
    assert stats.meta["require_fake"] is True and stats.threshold == pytest.approx(ref.threshold, rel=1e-5)
    assert main(["calibrate", str(stream.state), "--manifests", str(tmp_path), "--out", str(out)]) == 2
    assert "no manifests for the model's tasks ['deconv', 'nnconv']" in capsys.readouterr().err
