"""Every dvc.yaml of the repository, read without running DVC: a declared dependency that no longer exists (a renamed
module) would stop `dvc repro` before any work, so each one must exist or be another stage's output; and the detect
stage retrains only on the settings that change the detector."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lorax.detect.config import DetectConfig
from tests.helpers import REPO

TEMPLATE = re.compile(r"\$\{[^}]+\}")


def _dvc_files() -> list[Path]:
    skip = {".venv", ".git", ".dvc", "node_modules"}
    return sorted(p for p in REPO.rglob("dvc.yaml") if not skip & set(p.relative_to(REPO).parts))


def _entries(items: list | None) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (an entry is a string or a one-key mapping with options)."""
    out = []
    for item in items or []:
        out.extend([item] if isinstance(item, str) else list(item) if isinstance(item, dict) else [])
    return out


def _stages() -> list[tuple[Path, str, dict]]:
    """(folder the stage runs in, its name, its spec) of every stage of every dvc.yaml (``foreach`` bodies too)."""
    found = []
    for f in _dvc_files():
        for name, spec in (yaml.safe_load(f.read_text()).get("stages") or {}).items():
            body = spec.get("do", spec)
            found.append(((f.parent / body.get("wdir", ".")).resolve(), f"{f.relative_to(REPO)}:{name}", body))
    return found


def test_every_dependency_of_every_dvc_file_exists_or_is_made_by_a_stage() -> None:
    stages = _stages()
    assert {s.split(":")[0] for _, s, _ in stages} >= {"dvc.yaml", "pipelines/detection/dvc.yaml"}
    outs = [(wdir, p) for wdir, _, body in stages for key in ("outs", "metrics", "plots") for p in _entries(body.get(key))]
    made = {(wdir / p).resolve() for wdir, p in outs if not TEMPLATE.search(p)}
    # a folder whose entries are made per task (state/${key}, reports/eval/${key}.json) is made too
    made |= {(wdir / p[:p.index("${")].rpartition("/")[0]).resolve() for wdir, p in outs if TEMPLATE.search(p)}
    missing = []
    for wdir, stage, body in stages:
        for dep in _entries(body.get("deps")):
            if TEMPLATE.search(dep):  # data named by the settings (images, manifests): made by the stream's stages
                continue
            path = (wdir / dep).resolve()
            if not path.exists() and path not in made:
                missing.append(f"{stage}: {dep}")
    assert not missing, f"deps that neither exist nor are any stage's output (renamed or deleted?): {missing}"


def test_the_detect_stage_depends_on_every_training_setting_but_not_on_the_registry_ones() -> None:
    """Changing the registration gate must not retrain the detector; any other detect setting must."""
    spec = yaml.safe_load((REPO / "pipelines" / "detection" / "dvc.yaml").read_text())["stages"]
    detect = {p for p in spec["detect"]["params"] if isinstance(p, str)}
    registry_keys = {"registered_model", "register_min_ap"}
    assert {k for k in DetectConfig.model_fields if k not in registry_keys} <= {
        p.removeprefix("detect.") for p in detect if p.startswith("detect.")}
    assert not {f"detect.{k}" for k in registry_keys} & detect and "detect" not in detect
    assert {f"detect.{k}" for k in registry_keys} <= set(spec["register"]["params"])


def test_only_check_reads_the_cache_section() -> None:
    """The cache section changes no result: no stage but `check` (which reads the whole file, so a misspelt key stops
    `dvc repro`, and whose record is constant) declares it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["check"]["params"] == [{"params.yaml": None}]
    for _, name, body in _stages():
        if name.startswith("outputs/") or name == "dvc.yaml:check":  # outputs/: copies a benchmark left
            continue
        declared = [p if isinstance(p, str) else next(iter(p)) for p in body.get("params") or []]
        assert not [p for p in declared if p == "cache" or p.startswith("cache.") or p.endswith(".yaml")], name


def test_every_learner_setting_makes_its_stage_stale() -> None:
    """A continual or trace setting left out of its stage's params would let `dvc repro` keep a state trained with the
    old value: the exemplar choice belongs to `select`, everything else of `continual:` and `trace:` to `train`."""
    from lorax.config import ContinualConfig

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = {name: {p for p in stages[name]["do"]["params"] if isinstance(p, str)} for name in ("train", "select")}
    selection = {"memory_size", "memory_mode", "memory_per_class", "selection", "calibration_share"}
    assert {f"continual.{k}" for k in selection} <= declared["select"]
    train = declared["train"]
    missing = [k for k in ContinualConfig.model_fields if k not in selection and f"continual.{k}" not in train
               and "continual" not in train]
    assert not missing, f"continual settings no stage declares (a change would not retrain): {missing}"
    assert {"trace", "model", "adapter", "train"} <= train
