"""benchmarks.superfeature: the floor is measured next to the adapter modes, presets fill only what is not given."""

from __future__ import annotations

import json

from benchmarks import superfeature


def _run(capsys, *argv: str) -> dict:
    assert superfeature.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_floor_and_ratios_reported_for_every_task_count(capsys):
    out = _run(capsys, "--preset", "zoo16", "--tasks", "1", "3", "--batch", "2", "--repeats", "1")
    cfg = out["config"]
    assert (cfg["preset"], cfg["backbone"], cfg["img_size"], cfg["pretrained"]) == ("zoo16", "convit_tiny", 16, None)
    assert set(out["results"]) == {"1", "3"}
    for r in out["results"].values():
        for mode in ("floor", "sequential", "one_pass", "shared_trunk"):
            assert r[mode] > 0
        assert abs(r["one_pass_over_floor"] - r["floor"] / r["one_pass"]) < 0.01 * r["one_pass_over_floor"] + 1e-3
        assert abs(r["sequential_over_floor"] - r["floor"] / r["sequential"]) < 0.01 * r["sequential_over_floor"] + 1e-3


def test_old_flags_override_the_default_preset(capsys):
    """The tiny-zoo command line (explicit backbone, size, patch) still runs what it names, not the 224 px preset."""
    out = _run(capsys, "--backbone", "convit_tiny", "--img-size", "16", "--patch-size", "4", "--pretrained", "none",
               "--tasks", "2", "--batch", "2", "--repeats", "1", "--clock", "cpu")
    cfg = out["config"]
    assert (cfg["preset"], cfg["backbone"], cfg["img_size"], cfg["patch_size"]) == ("real224", "convit_tiny", 16, 4)
    assert cfg["pretrained"] is None and cfg["clock"] == "cpu"
    assert list(out["results"]) == ["2"]
