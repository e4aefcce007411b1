"""What several test modules build: the shrunk settings, tiny projects on disk with real DVC, CDDB folders of
generated images, crafted bad files and a real `mlflow models serve`. Test modules import these from here (never
from another test module); the conftest files hold only fixtures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from lorax.config import Params, load_params, set_by_path

REPO = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO / "params.yaml"
REALWORLD = REPO.parent / "shared" / "data" / "realworld"

# How the real params.yaml is shrunk for tests: tiny images, a tiny backbone, few images, one or two epochs.
TINY_OVERRIDES: dict[str, Any] = {
    "zoo.image_size": 24,
    "zoo.train_per_class": 12,
    "zoo.val_per_class": 6,
    "model.backbone": "convit_tiny",
    "model.img_size": 16,
    "model.pretrained": None,
    "model.normalize": "auto",
    "model.kwargs": {"depth": 2, "local_up_to_layer": 1, "patch_size": 4, "num_heads": 2, "embed_dim": 32},
    "model.feature_levels": [],  # the tiny model has 2 blocks (the real-image profile names blocks 4 and 8)
    "trace.patch": 8,  # trace experts: 8 px patches of the 24 px zoo images, 4 per image, a narrow network
    "trace.patches": 4,
    "trace.width": 4,
    "trace.dim": 8,
    "adapter.r": 4,
    "adapter.alpha": 1.0,
    "continual.memory_size": 8,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.warmup_epochs": 0,
    "eval.batch_size": 32,
    "stream": {"deconv": {"prev": "init"}, "nnconv": {"prev": "deconv"}},
}


def tiny_cli_sets(prefix: str = "model.") -> list[str]:
    """``-S key=value`` arguments that shrink the CLI's settings like :func:`tiny_params` (keys under ``prefix``)."""
    out: list[str] = []
    for k, v in TINY_OVERRIDES.items():
        if k.startswith(prefix):
            out += ["-S", f"{k}={json.dumps(v)}"]
    return out


def tiny_params(tmp_path: Path | None = None, **overrides: Any) -> Params:
    """The real params.yaml, shrunk; ``overrides`` use dotted keys with '__' for '.' (``train__epochs=2``)."""
    ov = dict(TINY_OVERRIDES)
    ov.update({k.replace("__", "."): v for k, v in overrides.items()})
    if tmp_path is not None:
        ov.setdefault("data.root", str(tmp_path / "zoo"))
        ov.setdefault("data.manifests", str(tmp_path / "manifests"))
        ov.setdefault("cache.dir", str(tmp_path / "cache"))
    elif "cache.dir" not in ov:  # no folder of the test's own: the feature store stays in memory, never in the repo
        ov.setdefault("cache.enabled", False)
    return load_params(PARAMS_YAML, ov)



def store_params(root: Path, **overrides: Any) -> Params:
    """:func:`tiny_params` for the feature-store tests: a depth-3 model whose last block alone is adapted (blocks
    0-1 are the frozen trunk), no adapter dropout, and the store under ``root``."""
    deep = {**TINY_OVERRIDES["model.kwargs"], "depth": 3}
    base = {"adapter__blocks": "last_k", "adapter__last_k": 1, "adapter__dropout": 0.0, "model__kwargs": deep,
            "cache__dir": str(root / "cache")}
    return tiny_params(root, **{**base, **overrides})


def prepared_zoo(root: Path, params: Params) -> dict:
    """The params' zoo synthesised and prepared under ``root``; its manifests by task."""
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    return load_stream_manifests(params.data.manifests, params.tasks)


# -- projects on disk, real DVC ------------------------------------------------------------------------------------
BIN = Path(sys.executable).parent


def evaluate_task_list(method: Any, manifests: list[Any], params: Params, device: Any = None,
                       store: Any = None) -> tuple[dict, Any]:
    """The seen tasks' val rows evaluated in this process, with lorax.continual.evaluation's parts: metrics dict (one
    column of R; with ``control`` when ``eval.resample_control`` is set) and a per-image table."""
    from lorax.continual.evaluation import evaluate_controls, predict_verdict, score_val, val_rows

    val = val_rows(manifests)
    logits, fake, thr = predict_verdict(method, val, params, device, store=store)
    result, table = score_val(val, logits, method.tasks, fake, thr)
    control = evaluate_controls(method, val, params, device, store)
    if control:
        result["control"] = control
    return result, table


def tool_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LORAX_CACHE_DIR", None)  # a developer's own cache is not the test project's
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", **extra})
    return env


def write_project(root: Path, stream: list[str], **overrides: Any) -> Path:
    """A project folder whose params.yaml is the real one shrunk (tiny zoo and model), with relative data paths."""
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    ov = dict(TINY_OVERRIDES)
    ov.update({"data.root": "data/zoo", "data.manifests": "data/manifests", "tracking.uri": None,
               "stream": {t: {"prev": "init" if i == 0 else stream[i - 1]} for i, t in enumerate(stream)}})
    ov.update({k.replace("__", "."): v for k, v in overrides.items()})
    for k, v in ov.items():
        set_by_path(raw, k, v)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def dvc_project(root: Path, stream: list[str], **overrides: Any) -> Path:
    """``write_project`` + the repo's dvc.yaml, its code (the stages declare it as dependencies, and run it) and plot
    templates in a fresh git repo with DVC initialised; the code is committed, as in the project's own repo."""
    write_project(root, stream, **overrides)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for pkg in ("lorax", "pipelines"):
        # (not pipelines/detection/: the detector's pipeline, which a test adds when it wants it)
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "detection"))
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    env = tool_env()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run(["git", "add", "lorax", "pipelines", ".gitignore", ".dvcignore"], cwd=root, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "code"], cwd=root, check=True, env=env)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([str(BIN / "dvc"), "config", "core.analytics", "false"], cwd=root, check=True, env=env)
    return root


def dvc(root: Path, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    res = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=tool_env(**extra_env), capture_output=True,
                         text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def stages_ran(output: str) -> list[str]:
    """Stage names from DVC's "Running stage 'x':" lines, in order."""
    return re.findall(r"Running stage '([^']+)'", output)


def repro_until(root: Path, path: Path, timeout_s: float = 600) -> subprocess.Popen:
    """Start ``dvc repro`` in ``root`` (in a session of its own, so a test can kill it with its stages) and return it
    once ``path`` exists: how the kill tests catch a training between its first epoch checkpoint and its end. On a
    failed wait the whole group is killed before the assertion propagates, so no stage outlives the test."""
    proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=root, env=tool_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout_s
        while not path.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert path.exists(), "the train stage never wrote its first epoch checkpoint"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc



# -- image folders and files ---------------------------------------------------------------------------------------
ImageFn = Callable[[str, int], np.ndarray]


def noise_images(rng: np.random.Generator, size: tuple[int, int] | Callable[[int], tuple[int, int]] = (40, 40),
                 real: tuple[int, int] = (0, 256), fake: tuple[int, int] = (0, 256)) -> ImageFn:
    """``image(label, k)`` for :func:`write_cddb`: RGB noise from ``rng``, (h, w) ``size`` (or ``size(k)``), values
    in ``real`` / ``fake`` (e.g. fakes brighter than reals: a difference a tiny model can learn)."""

    def image(label: str, k: int) -> np.ndarray:
        h, w = size(k) if callable(size) else size
        lo, hi = fake if label == "1_fake" else real
        return rng.integers(lo, hi, (h, w, 3), dtype=np.uint8)

    return image


def write_cddb(root: Path, tasks: list[str], n: int = 3, image: ImageFn | None = None,
               subclasses: dict[str, list[str]] | None = None) -> Path:
    """A CDDB folder, ``root/{task}/{train,val}/[{sub}/]{0_real,1_fake}/{k}.png`` with ``n`` PNGs per folder.

    ``image(label, k)``: the pixels of each file, in folder order (default: 40 x 40 noise, different in every file,
    seeded by the arguments: two calls for other folders or tasks never share an image)."""
    from PIL import Image

    if image is None:
        image = noise_images(np.random.default_rng(zlib.crc32(f"{root}|{tasks}|{n}|{subclasses}".encode())))
    for t in tasks:
        for split in ("train", "val"):
            for sub in (subclasses or {}).get(t, [""]):
                for label in ("0_real", "1_fake"):
                    folder = root / t / split / sub / label
                    folder.mkdir(parents=True, exist_ok=True)
                    for k in range(n):
                        Image.fromarray(image(label, k)).save(folder / f"{k}.png")
    return root


def learnable_cddb(root: Path, tasks: list[str], n: int = 3, size: int = 32) -> Path:
    """A CDDB folder of seeded random-noise PNGs, fakes brighter than reals (so a tiny model learns something)."""
    return write_cddb(root, tasks, n, noise_images(np.random.default_rng(0), (size, size), (0, 160), (96, 256)))


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h but carries (almost) no pixel data: a bomb that must not be decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    import struct

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# -- a real `mlflow models serve` ----------------------------------------------------------------------------------
MODEL = "models:/lorax-attributor@champion"
SERVER_START_S = 180  # bounded wait for the server to answer /ping


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, tracking_uri: str, folder: Path,
                 **env: str | None) -> tuple[subprocess.Popen, int, Path]:
    """The real `mlflow models serve` of ``model`` (local env, one worker) in ``folder``; ``env`` sets variables
    (None removes one). Returns (process, port, log file); call :func:`wait_up`, and :func:`stop_server` when done."""
    port = _free_port()
    merged = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
              "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    full_env = {k: v for k, v in merged.items() if v is not None}
    log = folder / f"server-{port}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True, cwd=folder)
    return proc, port, log


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_up(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer within {SERVER_START_S}s:\n{log.read_text()[-3000:]}")
