"""benchmarks.realworld --quick: the protocol's plumbing (LoRAX and the probe, both evaluations, one table)."""

from __future__ import annotations

import json

from benchmarks.realworld import main
from tests.helpers import learnable_cddb


def test_quick_protocol_writes_one_table_with_lorax_and_the_probe(tmp_path) -> None:
    root = learnable_cddb(tmp_path / "data", ["biggan", "stylegan2"], n=3, size=48)
    out = tmp_path / "out"
    assert main(["--quick", "--data", str(root), "--out", str(out), "--methods", "lorax", "probe", "--memory", "8",
                 "-S", f"cache.dir={tmp_path / 'cache'}"]) == 0
    rows = json.loads((out / "realworld.json").read_text())
    assert list(rows) == ["lorax-m8", "probe"]
    for m in rows.values():
        assert m["tasks"] == ["biggan", "stylegan2"] and 0 <= m["pooled_acc"] <= 100
        assert "pooled_acc" in m["control"]["resampled"] and m["wall_s"] > 0
        assert {"jpeg90", "jpeg60"} <= set(m["control"])  # the JPEG control beside the resampling one
        assert 0 <= m["balanced_acc"] <= 100 and 0 <= m["real_acc"] <= 100 and 0 < m["verdict_threshold"] < 1
    ci = json.loads((out / "realworld.compare.json").read_text())["lorax-m8 - probe"]
    assert ci["lo"] <= ci["diff"] <= ci["hi"] and ci["groups"] >= 2
    probe = json.loads((out / "probe" / "state" / "stylegan2" / "state.json").read_text())
    assert probe["epochs"] == [] and probe["head"]["kind"] == "refit"  # no gradient epoch: the head is the refit
    assert probe["params"]["train"]["epochs"] == 0
    table = (out / "realworld.md").read_text()
    assert "| lorax-m8 |" in table and "| probe |" in table


def test_a_resumed_run_counts_every_segment(tmp_path) -> None:
    """A run killed after saving, then resumed: its wall time is the killed segment up to its last saved file plus
    the resumed segment, not the last segment alone."""
    import json
    import os
    import time

    from benchmarks.realworld import SEGMENTS, close_segments, open_segment

    out = tmp_path / "run"
    first = open_segment(out)
    assert len(first) == 1 and first[0][1] is None
    killed_at = first[0][0] + 100.0  # the first segment saved its last task 100 s after it started ...
    saved = out / "state" / "task0" / "info.json"
    saved.parent.mkdir(parents=True)
    saved.write_text("{}")
    os.utime(saved, (killed_at, killed_at))
    # ... and was killed before closing: the next start closes it at that save
    segments = open_segment(out)
    assert len(segments) == 2 and segments[0][1] == killed_at
    time.sleep(0.05)
    wall = close_segments(out, segments)
    assert 100.0 < wall < 110.0
    assert json.loads((out / "wall.json").read_text()) == {"wall_s": wall, "segments": 2}
    assert not (out / SEGMENTS).exists()
