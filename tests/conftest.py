"""Shared fixtures. Tests shrink the project's real params.yaml instead of inventing settings of their own."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402

from lorax.config import Params  # noqa: E402

# Tiny tensors: one thread is faster, and avoids oversubscribing a shared 2-core machine.
torch.set_num_threads(1)

from tests.helpers import (  # noqa: E402,F401  (re-exported: tests import them from tests.helpers)
    PARAMS_YAML,
    REALWORLD,
    REPO,
    TINY_OVERRIDES,
    prepared_zoo,
    tiny_cli_sets,
    tiny_params,
)


@pytest.fixture
def params(tmp_path: Path) -> Params:
    return tiny_params(tmp_path)


os.environ.pop("LORAX_CACHE_DIR", None)  # a developer's own cache folder must not leak into the tests' projects
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
    from pipelines.train_stream import run_stream
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


TRACE_METHODS = ("trace", "lorax+trace")


@pytest.fixture(scope="session")
def trace_streams(tmp_path_factory):
    """The tiny 2-task zoo stream trained once per session with each trace method (read, never changed, by
    tests/continual/test_trace_methods.py and tests/serving/test_trace_serving.py): the manifests, and per method
    ``(params, run folder, metrics)``."""
    from pipelines.train_stream import run_stream

    root = tmp_path_factory.mktemp("trace")
    manifests = prepared_zoo(root, tiny_params(root))
    out = {}
    for name in TRACE_METHODS:
        params = tiny_params(root, continual__method=name)
        run = root / f"out_{name}"
        out[name] = params, run, run_stream(params, params.data.manifests, run)
    return manifests, out
