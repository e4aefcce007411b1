"""`lorax predict`: same pixels and crops as training, the output fields, bad inputs as error rows, CLI exits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.cli import main
from lorax.serving.errors import ServingError
from lorax.serving.inputs import collect_inputs
from lorax.serving.predict import COLUMNS, Predictor, write_table
from lorax.serving.schema import TOP_K, read_csv
from tests.helpers import png_header_only


def _rgb(h: int = 24, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_same_logits_as_training_evaluation(stream, predictor) -> None:
    from lorax.config import parse_params
    from lorax.continual.evaluation import predict_logits
    from lorax.data.manifest import abs_paths, read_manifest

    df = read_manifest(stream.manifests / "deconv.parquet")
    df = df[df["split"] == "val"].head(10)
    params = parse_params(predictor.info["params"])
    ref, _ = predict_logits(predictor.method, df, params, device=predictor.device)
    got = predictor.predict([str(p) for p in abs_paths(df)], progress=False)
    np.testing.assert_allclose(got.logits, ref, atol=1e-5)


def test_output_fields(stream, predictor) -> None:
    paths = [str(p) for p in stream.val_images("deconv")[:4] + stream.val_images("nnconv", "0_real")[:4]]
    res = predictor.predict(paths, progress=False, keep_features=True)
    t = res.table
    assert res.features.shape == (8, 2 * predictor.method.net.embed_dim)  # super-feature: embed_dim x tasks
    np.testing.assert_allclose(t["unknown_score"].to_numpy(dtype=float), predictor.openset.score(res.features))
    assert predictor.predict(paths[:1], progress=False).features.shape == (1, 0)  # not kept unless asked
    assert list(t.columns) == COLUMNS and list(t["path"]) == paths and (t["status"] == "ok").all()
    probs = np.exp(res.logits - res.logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    classes = ["deconv/real", "deconv/fake", "nnconv/real", "nnconv/fake"]
    assert predictor.classes == classes
    verdict = predictor.verdict  # the state's stored real/fake decision: one definition for every consumer
    assert verdict is not None and 0 < verdict.threshold < 1
    fake_p = verdict.fake_probability(res.features)
    for i, row in t.iterrows():
        fake = bool(fake_p[i] >= verdict.threshold)
        c = int(np.argmax(np.where(np.arange(4) % 2 == int(fake), probs[i], -1)))  # best class of the verdict's kind
        assert row["fake_probability"] == pytest.approx(fake_p[i]) and row["threshold"] == verdict.threshold
        assert row["verdict"] == ("fake" if fake else "real")
        assert (row["verdict"] == "fake") == (row["fake_probability"] >= row["threshold"])
        assert row["unknown"] == (fake and row["unknown_score"] > predictor.openset.threshold)
        if fake and not row["unknown"]:
            assert row["generator"] == classes[c].split("/")[0]
            assert row["generator_probability"] == pytest.approx(probs[i, c] / probs[i, 1::2].sum())
        else:  # a real verdict, or an unknown fake, names no generator
            assert pd.isna(row["generator"]) and pd.isna(row["generator_probability"])
        top = row["top"]
        assert len(top) == TOP_K and [e["class"] for e in top] == [classes[k] for k in np.argsort(-probs[i])[:TOP_K]]
        assert [e["probability"] for e in top] == pytest.approx(np.sort(probs[i])[::-1][:TOP_K].tolist())
        assert np.isfinite(row["unknown_score"]) and pd.isna(row["model_version"])  # a local state: no version
        assert row["width"] == 24 and row["height"] == 24


def test_bad_and_odd_images(tmp_path: Path, predictor) -> None:
    """Grey, alpha, 16-bit and palette images are converted like in training; unusable files become error rows."""
    rgb = _rgb()
    grey16 = (np.random.default_rng(1).integers(0, 65536, (24, 24))).astype(np.uint16)
    files = {
        "rgb.png": lambda p: Image.fromarray(rgb).save(p),
        "rgba_opaque.png": lambda p: Image.fromarray(np.dstack([rgb, np.full((24, 24), 255, np.uint8)])).save(p),
        "la.png": lambda p: Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA").save(p),
        "grey16.png": lambda p: Image.fromarray(grey16).save(p),
        "grey8.png": lambda p: Image.fromarray((grey16 >> 8).astype(np.uint8)).save(p),
        "palette.png": lambda p: Image.fromarray(rgb).convert("P").save(p, transparency=0),
        "small.png": lambda p: Image.fromarray(_rgb(8, 30)).save(p),
        "text.png": lambda p: p.write_text("not an image"),
        "empty.jpg": lambda p: p.write_bytes(b""),
        "truncated.png": lambda p: p.write_bytes(_png_bytes(rgb)[:80]),
        "bomb.png": lambda p: png_header_only(p, 20000, 20000),
    }
    for name, make in files.items():
        make(tmp_path / name)
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    paths = [str(tmp_path / n) for n in files] + [str(tmp_path / "missing.png")]
    res = predictor.predict(paths, progress=False)
    t = res.table.set_index(res.table["path"].map(lambda p: Path(p).name))
    ok = {"rgb.png", "rgba_opaque.png", "la.png", "grey16.png", "grey8.png", "palette.png"}
    assert set(t.index[t["status"] == "ok"]) == ok
    reasons = t["error"].to_dict()
    assert "smaller than the model's crop 16" in reasons["small.png"]
    assert "not an image" in reasons["text.png"]
    assert "empty file" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.png"] or "corrupt" in reasons["truncated.png"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert reasons["missing.png"] == "file not found"
    assert t.loc[list(ok), "error"].isna().all() and t.loc[~t.index.isin(ok), "verdict"].isna().all()
    logits = dict(zip(t.index, res.logits, strict=True))
    np.testing.assert_allclose(logits["rgba_opaque.png"], logits["rgb.png"], atol=1e-6)  # unused alpha: same pixels
    np.testing.assert_allclose(logits["grey16.png"], logits["grey8.png"], atol=1e-6)  # 16-bit -> high byte
    assert not np.allclose(logits["la.png"], logits["rgb.png"])


def _png_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_large_image_averages_deterministic_crops(tmp_path: Path, predictor) -> None:
    from lorax.data.dataset import crop_boxes

    big = _rgb(30, 40, seed=3)
    Image.fromarray(big).save(tmp_path / "big.png")
    boxes = crop_boxes(40, 30, predictor.crop, 4)
    assert len(set(boxes)) == 4
    for k, (l, t, r, b) in enumerate(boxes):
        Image.fromarray(big[t:b, l:r]).save(tmp_path / f"crop{k}.png")
    four = Predictor(predictor.method, predictor.info, "cpu", crops=4, openset=predictor.openset)
    multi = four.predict([str(tmp_path / "big.png")], progress=False, keep_features=True)
    single = predictor.predict([str(tmp_path / f"crop{k}.png") for k in range(4)], progress=False, keep_features=True)
    np.testing.assert_allclose(multi.logits[0], single.logits.mean(0), atol=1e-5)
    np.testing.assert_allclose(multi.features[0], single.features.mean(0), atol=1e-5)
    centre = predictor.predict([str(tmp_path / "big.png")], progress=False)  # default eval.crops = 1: centre crop
    l, t, r, b = crop_boxes(40, 30, predictor.crop, 1)[0]
    Image.fromarray(big[t:b, l:r]).save(tmp_path / "centre.png")
    np.testing.assert_allclose(centre.logits, predictor.predict([str(tmp_path / "centre.png")], progress=False).logits,
                               atol=1e-6)


def test_collect_inputs(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    for p in ("a/x.png", "a/deep/y.JPG", "a/.hidden/z.png", "a/notes.md", "list_target.webp"):
        (tmp_path / p).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# images\nlist_target.webp\n\n/abs/missing.png\n")
    got = collect_inputs([tmp_path / "a", tmp_path / "list.txt", tmp_path / "gone.png"])
    assert got == [str(tmp_path / "a" / "deep" / "y.JPG"), str(tmp_path / "a" / "x.png"),
                   str(tmp_path / "list_target.webp"), "/abs/missing.png", str(tmp_path / "gone.png")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServingError, match=r"no images to predict: .*empty \(empty\)"):
        collect_inputs([tmp_path / "empty"])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("x")
    with pytest.raises(ServingError, match="1 files, none with an image ending"):
        collect_inputs([tmp_path / "docs"])


def test_write_table_formats_agree(tmp_path: Path, stream, predictor) -> None:
    paths = [str(p) for p in stream.val_images("nnconv")[:3]] + [str(tmp_path / "missing.png")]
    table = predictor.predict(paths, progress=False).table
    csv = read_csv(write_table(table, tmp_path / "p.csv"))
    assert pd.read_csv(tmp_path / "p.csv")["top"].iloc[0].startswith('[{"class": ')  # a JSON string in CSV
    js = pd.DataFrame(json.loads(write_table(table, tmp_path / "p.json").read_text()))
    pq = pd.read_parquet(write_table(table, tmp_path / "p.parquet"))
    for got in (csv, js, pq):
        assert list(got.columns) == COLUMNS
        assert list(got["status"]) == ["ok", "ok", "ok", "error"]
        np.testing.assert_allclose(got["fake_probability"].astype(float)[:3],
                                   table["fake_probability"].astype(float)[:3])
        assert got["error"].iloc[3] == "file not found" and pd.isna(got["verdict"].iloc[3])
        for a, b in zip(got["top"], table["top"], strict=True):  # a real list (JSON keeps 10 digits)
            assert len(a) == TOP_K and [e and e["class"] for e in a] == [e and e["class"] for e in b]
            assert [e["probability"] for e in a if e] == pytest.approx([e["probability"] for e in b if e])
    with pytest.raises(ServingError, match=r"unknown format \.xlsx"):
        write_table(table, tmp_path / "p.xlsx")


def test_cli_predict(stream, tmp_path: Path, capsys) -> None:
    good = stream.val_images("deconv")[:2]
    (tmp_path / "bad.png").write_text("nope")
    out = tmp_path / "preds.parquet"
    assert main(["predict", str(good[0]), str(good[1]), str(tmp_path / "bad.png"), "--model", str(stream.out),
                 "--out", str(out), "--batch-size", "1"]) == 0
    t = pd.read_parquet(out)
    assert list(t["status"]) == ["ok", "ok", "error"] and t["unknown_score"][:2].notna().all()
    assert "3 images:" in capsys.readouterr().out
    # nothing usable: the output still lists why, and the exit is non-zero
    assert main(["predict", str(tmp_path / "bad.png"), "--model", str(stream.state), "--out",
                 str(tmp_path / "bad.csv")]) == 1
    assert "no image could be used" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "bad.csv")["error"].iloc[0].startswith("not an image")


def test_cli_predict_nothing_to_do(stream, tmp_path: Path, capsys, monkeypatch) -> None:
    img = str(stream.val_images("deconv")[0])
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "p.csv")
    monkeypatch.chdir(tmp_path)

    assert main(["predict", str(tmp_path / "empty"), "--model", str(stream.state), "--out", out]) == 2
    assert "no images to predict" in capsys.readouterr().err
    assert main(["predict", img, "--model", str(tmp_path / "nope"), "--out", out]) == 2
    assert "no such folder, and not a model URI" in capsys.readouterr().err
    assert main(["predict", img, "--model", str(stream.root), "--out", out]) == 2
    assert "not a lorax state" in capsys.readouterr().err
    assert main(["predict", img, "--model", str(stream.state), "--out", str(tmp_path / "p.txt")]) == 2
    assert "unknown format .txt" in capsys.readouterr().err
    assert not Path(out).exists()
