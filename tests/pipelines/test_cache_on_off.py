"""Results never depend on the cache: the zoo stream trained with the feature store on disk and in memory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from safetensors.numpy import load_file

from tests.helpers import BIN, PARAMS_YAML, TINY_OVERRIDES, tiny_params, tool_env


def _train(tmp: Path, out: str, *sets: str) -> Path:
    args = [str(BIN / "lorax"), "train", "--params", str(PARAMS_YAML), "--manifests", str(tmp / "manifests"),
            "--out", str(tmp / out), "-S", f"data.root={tmp / 'zoo'}"]
    for k, v in TINY_OVERRIDES.items():
        args += ["-S", f"{k}={json.dumps(v)}"]
    for s in sets:
        args += ["-S", s]
    res = subprocess.run(args, cwd=tmp, env=tool_env(), capture_output=True, text=True)  # a process each: no
    assert res.returncode == 0, res.stderr[-3000:]  # entry of one run can be in the other's memory
    return tmp / out


def _tensors(state_root: Path) -> dict[str, dict]:
    return {str(f.relative_to(state_root)): load_file(str(f)) for f in sorted(state_root.rglob("*.safetensors"))}


def test_the_zoo_stream_is_bit_identical_with_the_cache_on_and_off(tmp_path: Path) -> None:
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    params = tiny_params(tmp_path)
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    on = _train(tmp_path, "on", f"cache.dir={tmp_path / 'cache'}")
    off = _train(tmp_path, "off", "cache.enabled=false", f"cache.dir={tmp_path / 'unused'}")
    assert any((tmp_path / "cache" / "features").glob("*/*.safetensors"))  # on: the store was on disk
    assert not (tmp_path / "unused").exists()  # off: nothing written
    assert (on / "metrics.json").read_bytes() == (off / "metrics.json").read_bytes()
    details = [json.loads((d / "metrics_details.json").read_text()) for d in (on, off)]
    for d in details:
        d.pop("seconds_per_task")
    assert details[0] == details[1]
    a, b = _tensors(on / "state"), _tensors(off / "state")
    assert a.keys() == b.keys() and a
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert (a[f][k] == b[f][k]).all(), f"{f}: {k} differs"
    # a second run on the filled store reads what it needs and gives the same model
    again = _train(tmp_path, "again", f"cache.dir={tmp_path / 'cache'}")
    assert (again / "metrics.json").read_bytes() == (on / "metrics.json").read_bytes()
