"""benchmarks.adapter_search_t2i: configurations parse strictly, folds keep prompt groups whole, and a tiny search
runs end to end (frozen pass stored once and reused, every placement scored against the frozen features)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from benchmarks import adapter_search_t2i as search
from tests.helpers import PARAMS_YAML, learnable_cddb, tiny_cli_sets, write_cddb


@pytest.mark.parametrize("text, message", [("a:0:4:attn:8", "name:start:end"), ("a:0:4:conv:8:1", "where"),
                                           ("a:4:4:attn:8:1", "start < end")])
def test_bad_configs_are_refused_with_the_reason(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        search.SearchConfig.parse(text)


def test_config_fields():
    c = search.SearchConfig.parse("early4:0:4:both:16:2")
    assert (c.name, c.start, c.end, c.where, c.rank, c.epochs) == ("early4", 0, 4, "both", 16, 2)


def test_folds_keep_groups_whole_and_cover_every_fold():
    groups = np.array([f"prompt:{i % 30}" for i in range(210)], dtype=object)
    folds = search.grouped_folds(groups, 3)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    assert set(folds) == {0, 1, 2}
    assert (search.grouped_folds(groups, 3) == folds).all()  # seeded


def test_tiny_search_end_to_end(tmp_path, capsys):
    root = learnable_cddb(tmp_path / "data", ["a", "b"], n=8, size=24)
    argv = ["--params", str(PARAMS_YAML), *tiny_cli_sets(), "--data", str(root), "--tasks", "a", "b",
            "--manifests", str(tmp_path / "manifests"), "--out", str(tmp_path / "out"), "--cache",
            str(tmp_path / "cache"), "--folds", "2", "--batch", "8",
            "--config", "all2:0:2:attn:2:1", "--config", "last1:1:2:mlp:2:2"]
    assert search.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["fit_rows"] + first["test_rows"] == 2 * 2 * 8
    assert set(first["configs"]) == {"all2", "last1"}
    for name, r in first["configs"].items():
        assert r["adapter_params"] > 0 and r["steps"] > 0
        for part in ("adapter", "frozen+adapter"):
            assert 0 <= r[part]["pooled"] <= 100
        assert r["gain"] == pytest.approx(r["frozen+adapter"]["pooled"] - first["frozen"]["pooled"], abs=0.01)
    # one tap per start block: (images, corner crops, tokens, width) of the tiny ConViT (16 px, 4 px patches)
    shapes = {np.load(tmp_path / "cache" / f"tokens_{t}.npy", mmap_mode="r").shape for t in (0, 1)}
    assert len(shapes) == 1 and next(iter(shapes))[:3] == (32, 4, 16)
    stored = json.loads((tmp_path / "cache" / "done.json").read_text())
    assert stored["rows"] == 32
    # a second run reuses the frozen pass (same frozen score) and writes the same result file
    assert search.main(argv[:-4] + ["--config", "all2:0:2:attn:2:1"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["frozen"] == first["frozen"]
    assert json.loads((tmp_path / "cache" / "done.json").read_text()) == stored
    assert json.loads((tmp_path / "out" / "fold0.json").read_text())["configs"].keys() == {"all2"}
    assert np.load(tmp_path / "out" / "all2.features.npy").shape[0] == 32  # one adapter feature per train row


def test_frozen_only_with_other_crops_rewrites_the_pass(tmp_path, capsys):
    """--frozen-only scores the frozen features alone; a pass of another crop count is not reused for it."""
    root = learnable_cddb(tmp_path / "data", ["a", "b"], n=6, size=24)
    base = ["--params", str(PARAMS_YAML), *tiny_cli_sets(), "--data", str(root), "--tasks", "a", "b",
            "--manifests", str(tmp_path / "manifests"), "--out", str(tmp_path / "out"), "--cache",
            str(tmp_path / "cache"), "--folds", "2", "--frozen-only"]
    assert search.main([*base, "--crops", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["configs"] == {} and two["frozen_pass"]["crops"] == 2 and 0 <= two["frozen"]["pooled"] <= 100
    assert np.load(tmp_path / "cache" / "super.npy", mmap_mode="r").shape[:2] == (24, 2)
    assert search.main([*base, "--crops", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["frozen_pass"]["crops"] == 4
    assert np.load(tmp_path / "cache" / "super.npy", mmap_mode="r").shape[:2] == (24, 4)


def test_a_stored_pass_of_other_images_is_not_reused(tmp_path, capsys):
    """Same counts, crops and size, other images: the frozen pass is computed again, never read from the cache."""
    passes = []
    for name in ("one", "two"):
        root = write_cddb(tmp_path / name, ["a", "b"], n=6)
        assert search.main(["--params", str(PARAMS_YAML), *tiny_cli_sets(), "--data", str(root), "--tasks", "a",
                            "b", "--out", str(tmp_path / f"out-{name}"), "--cache", str(tmp_path / "cache"),
                            "--folds", "2", "--frozen-only"]) == 0
        passes.append(json.loads(capsys.readouterr().out)["frozen_pass"])
    assert passes[0]["rows"] == passes[1]["rows"] and passes[0]["images"] != passes[1]["images"]
    assert json.loads((tmp_path / "cache" / "done.json").read_text())["images"] == passes[1]["images"]
