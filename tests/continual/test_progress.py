"""Every step that can take minutes says so in the logs (non-TTY logs get no tqdm bar): start and end lines with
the elapsed seconds for evaluation passes, the head refit, the verdict fit (one line per fold)."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lorax.utils.progress import timed
from tests.helpers import tiny_params


def _messages(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_timed_logs_start_end_and_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("lorax.test_progress")
    caplog.set_level(logging.INFO, logger=log.name)
    with timed(log, "work"):
        pass
    with pytest.raises(KeyError), timed(log, "bad work"):
        raise KeyError("x")
    msgs = _messages(caplog, log.name)
    assert msgs[0] == "work ..." and re.fullmatch(r"work: done in \d+\.\d s", msgs[1])
    assert msgs[2] == "bad work ..." and re.fullmatch(r"bad work: stopped after \d+\.\d s", msgs[3])


def test_verdict_fit_logs_every_fold(caplog: pytest.LogCaptureFixture) -> None:
    from lorax.continual.verdict import fit_verdict

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 6)), np.r_[np.zeros(40, int), np.ones(40, int)]
    caplog.set_level(logging.INFO, logger="lorax.continual.verdict")
    fit_verdict(x, y)
    msgs = _messages(caplog, "lorax.continual.verdict")
    assert msgs[0].startswith("verdict fit: C in [0.01, 0.1, 1.0, 10.0] by a 5-fold cross-fit on 80 rows x 6")
    assert [m.split(" (")[0] for m in msgs[1:6]] == [f"verdict fit: fold {f}/5" for f in range(1, 6)]
    assert re.search(r": done in \d+\.\d s$", msgs[6]) and len(msgs) == 7


def test_head_refit_logs_start_end_and_its_lbfgs_iterations(caplog: pytest.LogCaptureFixture) -> None:
    from lorax.continual.head import refit_class_head

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 8, generator=g).numpy()
    rows = pd.DataFrame({"class_id": np.arange(60) % 4})
    method = SimpleNamespace(name="toy", head=torch.nn.Linear(8, 4))
    caplog.set_level(logging.DEBUG, logger="lorax.continual.head")
    info = refit_class_head(method, rows, tiny_params(continual__head="refit"), feats)
    msgs = _messages(caplog, "lorax.continual.head")
    assert msgs[0] == "head refit (refit) on 60 rows x 8 features ..."
    n_iter = re.fullmatch(r"head refit: L-BFGS (\d+) iterations, (\d+) function evaluations", msgs[1])
    assert n_iter and int(n_iter[1]) > 0
    assert re.fullmatch(r"head refit \(refit\) on 60 rows x 8 features: done in \d+\.\d s", msgs[2])
    assert info["head"]["rows"] == 60


def test_an_evaluation_pass_logs_start_and_end(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    from lorax.continual.evaluation import predict_logits
    from lorax.continual.methods import build_method
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    params = tiny_params(tmp_path)
    task = params.tasks[0]
    synth_tasks([task], params.data.root, params.zoo)
    prepare_tasks(params.data.root, [task], params.data.manifests, params.data, params.model.img_size)
    val = load_stream_manifests(params.data.manifests, [task])[task].query("split == 'val'")
    method = build_method(params, [task])
    caplog.set_level(logging.INFO, logger="lorax.continual.evaluation")
    logits, _ = predict_logits(method, val, params, torch.device("cpu"), desc="eval")
    msgs = _messages(caplog, "lorax.continual.evaluation")
    what = f"eval: {len(val)} images x {params.eval.crops} crops ({method.name})"
    assert msgs[0] == f"{what} ..." and re.fullmatch(re.escape(what) + r": done in \d+\.\d s", msgs[-1])
    assert len(logits) == len(val)
