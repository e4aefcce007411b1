"""The real-image profile (params.realworld.yaml) and the resampling shortcut control.

Tiny model (tests' TINY_OVERRIDES via -S), tiny CDDB folders made here; ``lorax train`` prepares their manifests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from lorax.config import load_params
from lorax.continual.summary import read_metrics
from pipelines.cli import main
from tests.helpers import PARAMS_YAML, REALWORLD, REPO, TINY_OVERRIDES, learnable_cddb

PROFILE = REPO / "params.realworld.yaml"
CONTROL_KEYS = {"aa", "aaf", "bwt", "forgetting", "pooled_acc", "binary_acc", "binary_acc_fitted", "binary_threshold",
                "binary_ap", "acc_matrix"}


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in ("stream", "kwargs", "resample_control", "spectrum"):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def tiny_sets(tasks: list[str]) -> list[str]:
    """-S arguments: the tests' tiny model and a two-task stream of ``tasks`` (last_k fits its 2 blocks)."""
    sets = {k: v for k, v in TINY_OVERRIDES.items() if not k.startswith(("stream", "zoo."))}
    sets["adapter.last_k"] = 1
    sets["model.spectrum"] = {"grid": 4, "sigma": 1.0}  # the profile's spectrum, on the tiny model's 16 px crops
    sets["stream"] = {tasks[0]: {"prev": "init"}, tasks[1]: {"prev": tasks[0]}}
    out = []
    for k, v in sets.items():
        out += ["-S", f"{k}={json.dumps(v)}"]
    return out


def test_profile_is_a_complete_valid_params_file():
    params = load_params(PROFILE)
    raw, base = yaml.safe_load(PROFILE.read_text()), yaml.safe_load(PARAMS_YAML.read_text())
    keys = _keys(raw)
    own = {k for k in keys if k.startswith("detect.model.")}  # the detector's own backbone section, when given
    grids = {k for k in keys | _keys(base) if k.startswith("tune.grid.")}  # a grid's keys are candidates, not settings
    # every setting of params.yaml is there: nothing falls back to a code default
    assert keys - own - grids == _keys(base) - grids
    assert "continual.method" in params.tune.grid  # the user's data decides on the trace experts
    model_keys = {k.removeprefix("model.") for k in _keys(base) if k.startswith("model.")}
    assert {k.removeprefix("detect.model.") for k in own} <= model_keys
    assert params.data.source == "folder" and params.model.img_size == 112
    # the detector keeps the backbone its figures were measured with (224 px, levels 4 + 8, spectrum)
    assert (params.detect.model.img_size, params.detect.model.feature_levels) == (224, [4, 8])
    assert params.detect.model.spectrum is not None
    assert params.tasks == ["biggan", "stylegan2", "ldif", "glid3", "dmin", "disco"]
    assert params.adapter.blocks == "last_k" and params.eval.crops > 1 and params.model.spectrum is not None
    rc = params.eval.resample_control
    assert rc is not None and round(256 * rc.scale) == 240 and rc.filter == "lanczos"
    assert load_params(PARAMS_YAML).eval.resample_control is None  # the zoo default stays as it was


def _train(tmp: Path, root: Path, tasks: list[str], *extra: str) -> int:
    return main(["train", "--params", str(PROFILE), "--manifests", str(tmp / "m"), "--out", str(tmp / "out"),
                 "-S", f"data.root={root}", "-S", f"cache.dir={tmp / 'cache'}", *tiny_sets(tasks), *extra])


def test_train_runs_the_profile_on_a_fresh_cddb_folder(tmp_path, capsys):
    root = learnable_cddb(tmp_path / "mine", ["a", "b"])
    assert _train(tmp_path, root, ["a", "b"]) == 0
    assert sorted(p.name for p in (tmp_path / "m").glob("*.parquet")) == ["a.parquet", "b.parquet"]  # prepared
    metrics = read_metrics(tmp_path / "out" / "metrics.json")
    assert metrics["tasks"] == ["a", "b"]
    assert CONTROL_KEYS <= set(metrics) and CONTROL_KEYS <= set(metrics["control"]["resampled"])
    state = json.loads((tmp_path / "out" / "state" / "b" / "state.json").read_text())
    assert state["params"]["eval"]["crops"] == 4 and state["params"]["adapter"]["blocks"] == "last_k"
    assert state["params"]["model"]["spectrum"]["grid"] == 4


def test_missing_task_folder_is_one_line(tmp_path, capsys):
    root = learnable_cddb(tmp_path / "mine", ["a"])
    assert _train(tmp_path, root, ["a", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'nosuch'" in err and "data.root" in err
    assert not (tmp_path / "m" / "a.parquet").exists()  # checked before any work


@pytest.fixture(scope="module")
def real_subset(tmp_path_factory) -> tuple[Path, Path]:
    """2 images per class and split of the protocol's first two real-world tasks, trained with the profile."""
    if not REALWORLD.is_dir():
        pytest.skip("shared real-world set not on this machine")
    tmp = tmp_path_factory.mktemp("rw")
    for t in ("biggan", "stylegan2"):
        for split in ("train", "val"):
            for label in ("0_real", "1_fake"):
                d = tmp / "data" / t / split / label
                d.mkdir(parents=True)
                for f in sorted((REALWORLD / t / split / label).glob("*.png"))[:2]:
                    shutil.copy(f, d / f.name)
    assert _train(tmp, tmp / "data", ["biggan", "stylegan2"]) == 0
    return tmp, tmp / "data"


def test_control_on_a_real_subset_reports_both(real_subset):
    tmp, _ = real_subset
    metrics = read_metrics(tmp / "out" / "metrics.json")
    as_is, res = metrics, metrics["control"]["resampled"]
    assert CONTROL_KEYS <= set(res)
    ev = json.loads((tmp / "out" / "eval" / "stylegan2.json").read_text())
    assert ev["control"]["resampled"]["scale"] == 0.9375 and len(ev["control"]["resampled"]["task_acc"]) == 2
    assert res["acc_matrix"][0][1] == ev["control"]["resampled"]["task_acc"][0]
    assert as_is["acc_matrix"][0][1] == ev["task_acc"][0]


def test_control_scores_resampled_pixels(real_subset):
    """The control's logits are those of resampled images, not the as-is ones (nor stored embeddings of them)."""
    from lorax.continual.evaluation import predict_logits, val_rows
    from lorax.continual.frozen_parts import trunk_producer
    from lorax.continual.state import load_state
    from lorax.data.manifest import load_stream_manifests
    from lorax.features import open_store
    from lorax.features.store import FeatureStore
    from lorax.features.views import eval_views

    tmp, _ = real_subset
    params = load_params(PROFILE, {"stream": {"biggan": {"prev": "init"}, "stylegan2": {"prev": "biggan"}},
                                   **{k: v for k, v in TINY_OVERRIDES.items() if not k.startswith(("stream", "zoo."))},
                                   "adapter.last_k": 1, "model.spectrum": {"grid": 4, "sigma": 1.0},
                                   "cache.dir": str(tmp / "cache")})
    method, _ = load_state(tmp / "out" / "state" / "stylegan2", params=params)
    val = val_rows(list(load_stream_manifests(tmp / "m", params.tasks).values()))
    store = open_store(params.cache)
    plain, _ = predict_logits(method, val, params, device=None, store=store)
    res, _ = predict_logits(method, val, params, device=None, store=store, resample=(0.9375, "lanczos"))
    again, _ = predict_logits(method, val, params, device=None, store=FeatureStore(None), resample=(0.9375, "lanczos"))
    assert not np.allclose(plain, res)
    # the store holds the resampled views apart, and what it holds is what a fresh computation gives (float32: the
    # training run computed them in other batch groupings, so the last bits may differ)
    np.testing.assert_allclose(res, again, rtol=1e-5, atol=1e-5)
    key = trunk_producer(method, params, torch.device("cpu"))[0]
    as_is, resampled = (eval_views(val, params.model.img_size, params.eval.crops, r).ids
                        for r in (None, (0.9375, "lanczos")))
    assert store.found(key, as_is).all() and store.found(key, resampled).all()
    assert {i.tobytes() for i in as_is}.isdisjoint(i.tobytes() for i in resampled)
    table = pd.read_csv(tmp / "out" / "eval" / "stylegan2.predictions.csv")
    assert len(table) == len(val)
