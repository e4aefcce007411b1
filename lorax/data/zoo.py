"""The built-in generator zoo: a small CDDB-layout dataset synthesised with no downloads (docs/design.md section 5).

``synth_tasks(["deconv", "nnconv"], root, cfg)`` writes ``root/{task}/{train,val}/{0_real,1_fake}/*.png``
and ``root/{task}/zoo.json``. A task is named after its generator (``zoo_generators.GENERATORS``); its real
images come from its own domain (``zoo_real.domain_for``), its fakes are other images of that domain
re-synthesised by the generator's decoder. Everything is a pure function of (``cfg.seed``, task name,
``cfg.image_size``, ``cfg.artifact``, split, index), so a re-run writes the same bytes (torch runs on one
thread here: its float reductions depend on the thread count), and each split and class is its own random
stream (changing ``train_per_class`` leaves the val images unchanged).

A task is written into a hidden temporary folder and renamed into place when complete, so an interrupted
run never leaves a half-written task. A complete task whose ``zoo.json`` matches the settings is skipped
(it would be rewritten identically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorax.config import ZooConfig
from lorax.data.zoo_generators import GENERATORS, build_decoder, get_spec, to_tensor
from lorax.data.zoo_real import domain_for, rng_for, sample_real

log = logging.getLogger(__name__)

ZOO_VERSION = 2  # bump when the synthesis changes, so existing tasks are rebuilt instead of skipped
SPLITS = ("train", "val")
LABELS = ("0_real", "1_fake")
_BATCH = 256


def scenario_generators(scenario: str, cfg: ZooConfig) -> list[str]:
    """``zoo-N``: the first N generators of ``cfg.order``."""
    allowed = f"zoo-1 .. zoo-{len(cfg.order)} (the first N generators of zoo.order)"
    m = re.fullmatch(r"zoo-(\d+)", scenario.strip())
    if not m:
        raise ValueError(f"unknown zoo scenario {scenario!r}; allowed values: {allowed}")
    n = int(m.group(1))
    if not 1 <= n <= len(cfg.order):
        raise ValueError(f"zoo scenario {scenario!r} needs {n} generators but zoo.order has {len(cfg.order)}; "
                         f"allowed values: {allowed}")
    return list(cfg.order[:n])


def _check_names(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown zoo generator(s) {unknown}; known generators: {', '.join(GENERATORS)}")


def file_name(task: str, split: str, label: str, i: int) -> str:
    return f"{task}_{split}_{label.split('_')[1]}_{i:05d}.png"


def _counts(cfg: ZooConfig) -> dict[str, dict[str, int]]:
    n = {"train": cfg.train_per_class, "val": cfg.val_per_class}
    return {split: {label: n[split] for label in LABELS} for split in SPLITS}


def _settings(name: str, cfg: ZooConfig) -> dict:
    """Everything the task's bytes depend on: equal settings mean an identical task."""
    spec = get_spec(name)
    return {
        "zoo_version": ZOO_VERSION,
        "task": name,
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "counts": _counts(cfg),
        "generator": {"name": name, "description": spec.description, "downsample": spec.factor,
                      "artifact": cfg.artifact},
        "domain": domain_for(cfg.seed, name).describe(),
    }


def render_task(name: str, cfg: ZooConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The task's images in memory: split -> (real, fake), each uint8 (N, H, W, 3)."""
    _check_names([name])
    size, domain = cfg.image_size, domain_for(cfg.seed, name)
    decoder = build_decoder(name, cfg.seed, domain, size, cfg.artifact)
    out = {}
    for split, n in (("train", cfg.train_per_class), ("val", cfg.val_per_class)):
        rng = rng_for(cfg.seed, "real", name, split)
        real = np.stack([sample_real(rng, domain, size) for _ in range(n)])
        # the generator's sources: other images of the same domain, from their own stream
        rng = rng_for(cfg.seed, "source", name, split)
        source = np.stack([sample_real(rng, domain, size) for _ in range(n)])
        with torch.no_grad():
            fake = np.concatenate(
                [decoder(to_tensor(source[i : i + _BATCH])).permute(0, 2, 3, 1).numpy() for i in range(0, n, _BATCH)]
            )
        out[split] = (_to_uint8(real), _to_uint8(fake))
    return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _is_complete(task_dir: Path, settings: dict) -> bool:
    meta = task_dir / "zoo.json"
    if not meta.is_file():
        return False
    try:
        old = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if {k: old.get(k) for k in settings} != json.loads(json.dumps(settings)):
        return False
    return all(
        len(list((task_dir / split / label).glob("*.png"))) == n
        for split, per in settings["counts"].items()
        for label, n in per.items()
    )


def _remove_stale(out_root: Path, name: str) -> None:
    """Leftovers of interrupted runs (``.{name}.tmp-PID`` / ``.old-PID`` whose process is gone)."""
    for p in out_root.glob(f".{name}.*-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def synth_task(name: str, out_root: str | Path, cfg: ZooConfig) -> dict:
    """Write task ``name`` under ``out_root`` (skipped if already complete); returns its counts."""
    _check_names([name])
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    settings = _settings(name, cfg)
    target = out_root / name
    if _is_complete(target, settings):
        log.info("zoo task %s is complete in %s: skipped", name, out_root)
        return settings["counts"]
    _remove_stale(out_root, name)
    tmp = out_root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        digest = hashlib.sha256()
        for split, (real, fake) in render_task(name, cfg).items():
            for label, images in zip(LABELS, (real, fake)):
                folder = tmp / split / label
                folder.mkdir(parents=True)
                for i, img in enumerate(images):
                    path = folder / file_name(name, split, label, i)
                    Image.fromarray(img).save(path, format="PNG")
                    digest.update(path.read_bytes())
        meta = {**settings, "sha256": digest.hexdigest()}
        (tmp / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            old = out_root / f".{name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return settings["counts"]


def synth_tasks(tasks: list[str], out_root: str | Path, cfg: ZooConfig) -> dict[str, dict]:
    """Write every task of ``tasks`` (generator names) under ``out_root``; returns task -> counts."""
    _check_names(list(tasks))
    return {name: synth_task(name, out_root, cfg) for name in tasks}
