"""One tiny trained stream (2 zoo tasks, 1 epoch) shared by the serving tests, with its open-set calibration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lorax.config import Params
from tests.conftest import tiny_params


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
    from lorax.continual.stream import run_stream
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks
    from lorax.serving.openset import calibrate_state

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
