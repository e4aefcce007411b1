"""benchmarks/head_memory.py: the last head refit on the state's own rows reproduces the state; more rows of every
old class are drawn as asked."""

from __future__ import annotations

import pytest

from benchmarks.head_memory import head_memory, markdown
from tests.helpers import prepared_zoo, tiny_params


@pytest.mark.slow
def test_refit_on_the_states_own_rows_reproduces_it(tmp_path):
    from pipelines.train_stream import run_stream

    params = tiny_params(tmp_path, continual__head="refit")
    manifests = prepared_zoo(tmp_path, params)
    run = tmp_path / "run"
    run_stream(params, params.data.manifests, run)
    res = head_memory(run, manifests, params.cache, per_class=[2, 10_000], seed=0)

    assert res["own"]["pooled"] == pytest.approx(res["state"]["pooled"], abs=1e-9)
    assert res["own"]["per_task"] == res["state"]["per_task"]
    last = manifests[params.tasks[-1]]
    n_new = int((last["split"] == "train").sum())
    old = manifests[params.tasks[0]]
    n_old = int((old["split"] == "train").sum())
    assert res["2_per_old_class"]["rows"] == n_new + 2 * 2  # two rows of each of the first task's two classes
    assert res["10000_per_old_class"]["rows"] == n_new + n_old  # every old train row, none twice
    assert res["own_balanced"]["rows"] == res["own"]["rows"]
    assert "10000_per_old_class" in markdown(res)
