"""``lorax data prepare``: layouts, quarantine, leakage and the failure rules, on folders built in tmp_path."""

from __future__ import annotations

import csv
import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lorax.config import DataConfig
from lorax.data.manifest import MANIFEST_COLUMNS, read_manifest
from lorax.data.prepare import DataError, prepare_task, prepare_tasks, quarantine_path
from tests.helpers import write_cddb
CROP = 32
REALWORLD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "realworld"  # read-only, CDDB layout
_seed = itertools.count(1000)


def _img(path: Path, size: int = 40, seed: int | None = None, mode: str = "RGB") -> Path:
    """A unique random image (unique content, so no accidental leakage)."""
    rng = np.random.default_rng(next(_seed) if seed is None else seed)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).convert(mode).save(path)
    return path


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime) for p in root.rglob("*")}


def _quarantine(out: Path, task: str) -> dict[str, str]:
    with open(quarantine_path(out, task)) as f:
        return {Path(r["file"]).name: r["reason"] for r in csv.DictReader(f)}


def test_cddb_manifest_columns_counts_and_class_ids(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["beta", "alpha"], n=2, subclasses={"beta": ["cat", "dog"]})
    before = _snapshot(root)
    res = prepare_tasks(root, ["beta", "alpha"], tmp_path / "m", cfg(), CROP)
    assert _snapshot(root) == before  # source folders untouched
    assert [r.task for r in res] == ["beta", "alpha"] and [r.task_index for r in res] == [0, 1]
    beta = read_manifest(tmp_path / "m" / "beta.parquet")
    assert list(beta.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert len(beta) == 16 and set(beta["subclass"]) == {"cat", "dog"}
    alpha = read_manifest(tmp_path / "m" / "alpha.parquet")
    assert sorted(set(alpha["class_id"])) == [2, 3] and sorted(set(beta["class_id"])) == [0, 1]
    assert (alpha["class_id"] == 2 + alpha["label"]).all()
    assert (alpha.groupby(["split", "label"]).size() == 2).all()
    row = alpha.iloc[0]
    assert (root / row["path"]).is_file() and Path(row["root"]) == root and not Path(row["path"]).is_absolute()
    assert row["path"].startswith("alpha/") and (row["width"], row["height"], row["mode"]) == (40, 40, "RGB")
    assert res[1].counts == {("train", 0): 2, ("train", 1): 2, ("val", 0): 2, ("val", 1): 2}
    assert "0 quarantined" in res[1].summary() and "auto-detected cddb" in res[1].summary()
    assert quarantine_path(tmp_path / "m", "alpha").read_text() == "file,reason\n"
    assert not list((tmp_path / "m").glob("*.tmp"))
    # tasks=None: every task folder, sorted
    res = prepare_tasks(root, None, tmp_path / "m2", cfg(), CROP)
    assert [r.task for r in res] == ["alpha", "beta"]


def test_bad_files_are_quarantined_and_counted(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["t"], n=25)
    d = root / "t" / "train" / "1_fake"
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    good = _img(tmp_path / "full.png", size=64)
    (d / "trunc.png").write_bytes(good.read_bytes()[:200])
    (d / "dir.png").mkdir()
    (d / "link.png").symlink_to(d / "nowhere.png")
    _img(d / "small.png", size=20)
    (d / ".hidden.png").write_bytes(b"")  # hidden files are not data
    res = prepare_task(root, "t", 0, tmp_path / "m", cfg(bad_file_limit=0.2), CROP)
    q = _quarantine(tmp_path / "m", "t")
    assert set(q) == {"zero.png", "text.png", "trunc.png", "dir.png", "link.png", "small.png"}
    assert q["small.png"].startswith("smaller than crop 32")
    assert q["zero.png"].startswith("empty file") and "dangling symlink" in q["link.png"]
    assert len(res.bad) == 6 and "6 quarantined" in res.summary()
    df = read_manifest(res.manifest)
    assert len(df) == 100 and not df["path"].str.contains("zero|text|trunc|small").any()


def test_odd_modes_are_kept_in_manifest(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["t"], n=2)
    d = root / "t" / "train" / "0_real"
    for mode in ("L", "P", "RGBA", "LA", "CMYK"):
        _img(d / f"m_{mode}.{'tif' if mode == 'CMYK' else 'png'}", mode=mode)
    v = np.random.default_rng(7).integers(0, 65536, (40, 40), dtype=np.uint16)
    Image.fromarray(v).save(d / "m_16.png")
    df = read_manifest(prepare_task(root, "t", 0, tmp_path / "m", cfg(), CROP).manifest)
    modes = dict(zip(df["path"].map(lambda p: Path(p).stem), df["mode"], strict=True))
    assert {k: modes[k] for k in modes if k.startswith("m_")} == {
        "m_L": "L", "m_P": "P", "m_RGBA": "RGBA", "m_LA": "LA", "m_CMYK": "CMYK", "m_16": "I;16"
    }


def test_strict_makes_any_bad_file_fatal(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["t"], n=30)
    (root / "t" / "val" / "0_real" / "zero.jpg").write_bytes(b"")
    prepare_task(root, "t", 0, tmp_path / "m", cfg(), CROP)  # 1 of 121: within the 5% limit
    with pytest.raises(DataError, match=r"zero\.jpg: empty file.*strict"):
        prepare_task(root, "t", 0, tmp_path / "m2", cfg(strict=True), CROP)
    assert "zero.jpg" in quarantine_path(tmp_path / "m2", "t").read_text()  # the report is written anyway
    assert not (tmp_path / "m2" / "t.parquet").exists()


def test_too_many_bad_files_fail(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["t"], n=3)
    for k in range(2):
        (root / "t" / "train" / "0_real" / f"bad{k}.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"2 of 14 files \(14\.3%\).*data\.bad_file_limit=0\.05"):
        prepare_task(root, "t", 0, tmp_path / "m", cfg(), CROP)
    prepare_task(root, "t", 0, tmp_path / "m", cfg(bad_file_limit=0.2), CROP)


def test_missing_task_lists_existing(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["gaugan", "biggan"], n=1)
    with pytest.raises(DataError, match=r"\['nope'\] not found; tasks in .*\['biggan', 'gaugan'\]"):
        prepare_tasks(root, ["biggan", "nope"], tmp_path / "m", cfg(), CROP)
    assert not (tmp_path / "m").exists()  # checked before any work
    with pytest.raises(DataError, match="listed twice"):
        prepare_tasks(root, ["biggan", "biggan"], tmp_path / "m", cfg(), CROP)
    with pytest.raises(DataError, match="dataset root not found"):
        prepare_tasks(tmp_path / "absent", None, tmp_path / "m", cfg(), CROP)


def test_empty_and_missing_class_folders(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["t"], n=1)
    empty = root / "t" / "train" / "1_fake"
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=rf"{empty}: empty class folder"):
        prepare_task(root, "t", 0, tmp_path / "m", cfg(), CROP)
    empty.rmdir()
    with pytest.raises(DataError, match=r"train: no 1_fake/ folder"):
        prepare_task(root, "t", 0, tmp_path / "m", cfg(), CROP)
    # a class whose only files are all bad is also an error, naming it
    empty.mkdir()
    (empty / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"no usable 1_fake images in train \(1 of its files were quarantined\)"):
        prepare_task(root, "t", 0, tmp_path / "m", cfg(bad_file_limit=1.0), CROP)


def test_missing_split_folder(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["t"], n=1)
    for f in (root / "t" / "val").rglob("*.png"):
        f.unlink()
    for d in sorted((root / "t" / "val").rglob("*"), reverse=True):
        d.rmdir()
    (root / "t" / "val").rmdir()
    with pytest.raises(DataError, match=r"t/val: split folder missing"):
        prepare_task(root, "t", 0, tmp_path / "m", cfg(layout="cddb"), CROP)


def test_leakage_train_val_and_across_tasks(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["a", "b"], n=2)
    # the same pixels, re-encoded (other compression): caught by the pixel hash
    src = root / "a" / "train" / "0_real" / "0.png"
    Image.open(src).save(root / "a" / "val" / "0_real" / "copy.png", compress_level=1)
    with pytest.raises(DataError, match=r"(?s)train and val of task 'a'.*0\.png  ==  .*copy\.png.*check_leakage"):
        prepare_task(root, "a", 0, tmp_path / "m", cfg(), CROP)
    res = prepare_task(root, "a", 0, tmp_path / "m", cfg(check_leakage=False), CROP)
    assert any("check_leakage is false" in n for n in res.notes)
    (root / "a" / "val" / "0_real" / "copy.png").unlink()
    prepare_task(root, "a", 0, tmp_path / "m", cfg(), CROP)
    prepare_task(root, "a", 0, tmp_path / "m", cfg(), CROP)  # not compared with its own old manifest
    # b reuses one of a's fakes: compared against a's manifest already in out_dir
    (root / "b" / "val" / "1_fake" / "stolen.png").write_bytes((root / "a" / "train" / "1_fake" / "1.png").read_bytes())
    leak = r"(?s)in task 'b' and in .*a\.parquet.*stolen\.png  ==  .*a/train/1_fake/1\.png"
    with pytest.raises(DataError, match=leak):
        prepare_task(root, "b", 1, tmp_path / "m", cfg(), CROP)
    prepare_task(root, "b", 1, tmp_path / "m", cfg(check_leakage=False), CROP)
    with pytest.raises(DataError, match=r"in task 'a' and in .*b\.parquet"):  # and now a meets b's manifest
        prepare_task(root, "a", 0, tmp_path / "m", cfg(), CROP)


def test_univfd_layout_hash_split(tmp_path: Path) -> None:
    root = tmp_path / "cnn"
    for cat in ("car", "cat"):
        for cls in ("0_real", "1_fake"):
            for k in range(10):
                _img(root / "progan" / cat / cls / f"{k}.png")
    for cls in ("0_real", "1_fake"):
        for k in range(2):
            _img(root / "flat" / cls / f"{k}.png")
    res = prepare_tasks(root, None, tmp_path / "m", cfg(), CROP)
    assert [r.layout for r in res] == ["univfd", "univfd"]
    assert any("split by content hash (80/20)" in n for n in res[1].notes)
    df = read_manifest(res[1].manifest)
    assert set(df["subclass"]) == {"car", "cat"} and len(df) == 40
    assert 3 <= (df["split"] == "val").sum() <= 16
    # deterministic, and a function of the content only
    again = read_manifest(prepare_task(root, "progan", 1, tmp_path / "m2", cfg(layout="univfd"), CROP).manifest)
    pd.testing.assert_frame_equal(df, again)
    flat = read_manifest(res[0].manifest)  # 2 per class: each class still gets one image in each split
    assert (flat.groupby(["split", "label"]).size() == 1).all() and set(flat["subclass"]) == {""}


def test_genimage_layout(tmp_path: Path) -> None:
    root = tmp_path / "gi"
    for split in ("train", "val"):
        for cls in ("ai", "nature"):
            for k in range(2):
                _img(root / "sdv14" / split / cls / f"{k}.png")
    (root / "sdv14" / "train" / "ai" / "x.txt").write_text("readme")
    res = prepare_task(root, "sdv14", 3, tmp_path / "m", cfg(bad_file_limit=0.5), CROP)
    df = read_manifest(res.manifest)
    assert res.layout == "genimage" and len(df) == 8 and res.bad  # the .txt is quarantined, not silently skipped
    assert set(df.loc[df["path"].str.contains("/ai/"), "class_id"]) == {7}
    assert set(df.loc[df["path"].str.contains("/nature/"), "class_id"]) == {6}


def test_unknown_layout_and_forced_layout_mismatch(tmp_path: Path) -> None:
    _img(tmp_path / "ds" / "t" / "images" / "0.png")
    with pytest.raises(DataError, match=r"t: matches no known dataset layout.*cddb: "):
        prepare_task(tmp_path / "ds", "t", 0, tmp_path / "m", cfg(), CROP)
    root = write_cddb(tmp_path / "ds2", ["t"], n=1)
    with pytest.raises(DataError, match="no class folders found for the genimage layout"):
        prepare_task(root, "t", 0, tmp_path / "m", cfg(layout="genimage"), CROP)


def test_cddb_test_folder_is_ignored_with_a_note(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["t"], n=1)
    _img(root / "t" / "test" / "0_real" / "0.png")
    res = prepare_task(root, "t", 0, tmp_path / "m", cfg(), CROP)
    assert res.n_images == 4 and any("ignored folders ['test']" in n for n in res.notes)


def test_parallel_workers_give_the_same_manifest(tmp_path: Path, monkeypatch) -> None:
    from lorax.data import prepare

    root = write_cddb(tmp_path / "ds", ["t"], n=20)
    (root / "t" / "train" / "0_real" / "bad.png").write_bytes(b"junk")
    monkeypatch.setattr(prepare, "_auto_workers", lambda n_files: 1)
    a = prepare_task(root, "t", 0, tmp_path / "m1", cfg(), CROP)
    monkeypatch.setattr(prepare, "_auto_workers", lambda n_files: 2)  # (many files get several processes)
    b = prepare_task(root, "t", 0, tmp_path / "m2", cfg(), CROP)
    pd.testing.assert_frame_equal(read_manifest(a.manifest), read_manifest(b.manifest))
    assert a.bad == b.bad and len(a.bad) == 1


@pytest.mark.slow
@pytest.mark.skipif(not REALWORLD.is_dir(), reason="shared real-world set not on this machine")
def test_realworld_counts_match_its_manifest(tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime for p in REALWORLD.rglob("*")}
    res = prepare_tasks(REALWORLD, None, tmp_path / "m", cfg(), CROP)
    ref = pd.read_csv(REALWORLD / "manifest.csv")
    assert [r.task for r in res] == sorted(ref["task"].unique())
    got = pd.concat([read_manifest(r.manifest) for r in res])
    assert sum(len(r.bad) for r in res) == 0 and len(got) == len(ref) == 391
    want = ref.groupby(["task", "split", "label"]).size()
    pd.testing.assert_series_equal(got.groupby(["task", "split", "label"]).size(), want)
    merged = got.merge(ref[["path", "sha256"]], on="path", suffixes=("", "_ref"))
    assert len(merged) == 391 and (merged["sha256"] == merged["sha256_ref"]).all()
    assert set(got["mode"]) == {"RGB"} and set(got["width"]) == {256}
    assert {p: p.stat().st_mtime for p in REALWORLD.rglob("*")} == before
    assert os.access(tmp_path / "m" / "biggan.parquet", os.R_OK)


def test_foreign_parquet_in_out_dir_is_skipped_with_a_note(tmp_path: Path) -> None:
    root = write_cddb(tmp_path / "ds", ["t"], n=1)
    (tmp_path / "m").mkdir()
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "m" / "scores.parquet")
    res = prepare_task(root, "t", 0, tmp_path / "m", cfg(), CROP)
    assert any("scores.parquet in the leakage check: not a lorax manifest" in n for n in res.notes)
    assert "note: skipped" in res.summary()


def test_a_root_given_relative_to_the_working_directory_reads_back(tmp_path: Path, monkeypatch) -> None:
    """`lorax data prepare` with data.root's relative default (data/zoo): the manifest stores the rows as lying
    under data.root, not under data.root/data/zoo (a relative root used to be stored as given and re-joined)."""
    write_cddb(tmp_path / "data" / "ds", ["alpha"], n=2)
    monkeypatch.chdir(tmp_path)
    prepare_tasks(Path("data/ds"), ["alpha"], Path("m"), cfg(), CROP)
    assert set(pd.read_parquet("m/alpha.parquet")["root"]) == {"."}
    for data_root in (Path("data/ds"), tmp_path / "data" / "ds", None):  # relative, absolute, the stored hint
        df = read_manifest(Path("m/alpha.parquet"), data_root)
        assert all(Path(r, p).is_file() for r, p in zip(df["root"], df["path"], strict=True))
