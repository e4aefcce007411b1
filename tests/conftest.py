"""Shared fixtures. Tests shrink the project's real params.yaml instead of inventing settings of their own."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402

from lorax.config import Params, load_params  # noqa: E402

# Tiny tensors: one thread is faster, and avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)

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
    import json

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
    return load_params(PARAMS_YAML, ov)


@pytest.fixture
def params(tmp_path: Path) -> Params:
    return tiny_params(tmp_path)


_MLFLOW_ENV = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


@pytest.fixture(autouse=True)
def _restore_mlflow_uri_env():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI; keep one test's store from leaking into the next."""
    yield
    for k, v in _MLFLOW_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- one tiny trained stream (2 zoo tasks, 1 epoch) with its open-set calibration, shared by the serving and
# security tests (session scope: trained once per test run)


@dataclass
class Stream:
    root: Path
    params: Params
    out: Path  # `lorax train` output folder

    @property
    def state(self) -> Path:
        return self.out / "state" / self.params.tasks[-1]

    @property
    def manifests(self) -> Path:
        return Path(self.params.data.manifests)

    def val_images(self, task: str, label: str = "1_fake") -> list[Path]:
        return sorted((Path(self.params.data.root) / task / "val" / label).glob("*.png"))


@pytest.fixture(scope="session")
def stream(tmp_path_factory) -> Stream:
    from pipelines.stream import run_stream
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks
    from lorax.serving.calibration import calibrate_state

    root = tmp_path_factory.mktemp("serving")
    params = tiny_params(root)
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    s = Stream(root, params, root / "out")
    run_stream(params, params.data.manifests, s.out)
    calibrate_state(s.state, s.manifests)
    return s


@pytest.fixture(scope="session")
def predictor(stream):
    from lorax.serving.predict import Predictor

    return Predictor.from_state(stream.state, device="cpu")


@pytest.fixture(scope="module")
def registry(stream, tmp_path_factory):
    """The stream's last state registered (with its open-set calibration) as champion in a sqlite store."""
    import json

    from lorax.continual.state import state_hash
    from pipelines.tracking import model_registry as reg
    from pipelines.tracking.tracker import Tracker

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = stream.params.model_copy(deep=True)
    params.tracking.uri = uri
    tracker = Tracker(params, root)
    parent = tracker.start_stream(params.tasks)
    run_id = tracker.start_task(parent, params.tasks[-1], len(params.tasks) - 1)
    ev = json.loads((stream.out / "eval" / f"{params.tasks[-1]}.json").read_text())
    rec = reg.register(tracker, task=params.tasks[-1], tasks=params.tasks, state_dir=stream.state,
                       memory_path=stream.out / "memory" / f"{params.tasks[-1]}.parquet", eval_result=ev,
                       run_id=run_id, state_id=state_hash(stream.state))
    assert "champion" in rec["aliases"]
    return uri
