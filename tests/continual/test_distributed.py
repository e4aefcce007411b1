"""DDP: sharded batches are the one-process batches; two gloo processes train a tiny stream like one process."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import yaml

from lorax.config import set_by_path
from lorax.continual.distributed import DistContext, ShardedBatchSampler
from lorax.continual.methods import build_method
from lorax.continual.summary import read_metrics
from lorax.continual.batches import loader_for
from lorax.data.dataset import SeededSampler, make_loader
from tests.helpers import PARAMS_YAML, TINY_OVERRIDES, tiny_params

# batch 9 over 24 and 32 rows: ranks get 5 and 4 images per step and short last batches (uneven shares)
DDP_OVERRIDES = {"train.batch_size": 9, "train.epochs": 2, "adapter.dropout": 0.0, "continual.memory_size": 8}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    root = tmp_path_factory.mktemp("ddp")
    params = tiny_params(root, **{k.replace(".", "__"): v for k, v in DDP_OVERRIDES.items()})
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    return root, params


def test_one_rank_batches_equal_make_loader(zoo):
    from lorax.data.manifest import load_stream_manifests

    _, params = zoo
    df = load_stream_manifests(params.data.manifests, params.tasks)["deconv"]
    rows = df[df["split"] == "train"].reset_index(drop=True)
    method = build_method(params, ["deconv"])
    ref = make_loader(rows, train=True, crop=params.model.img_size, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=9,
                      seed=123)
    got = loader_for(rows, method, params, train=True, seed=123)
    pairs = list(zip(ref, got, strict=True))
    assert len(pairs) == 3  # 24 rows: 9 + 9 + 6
    for (xa, ya, ra), (xb, yb, rb) in pairs:
        assert torch.equal(ra, rb) and torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("n, batch, world", [(24, 9, 2), (10, 9, 2), (7, 4, 3)])
def test_rank_shares_partition_each_global_batch(n, batch, world):
    def items(seed):
        return SeededSampler(n, shuffle=True, generator=torch.Generator().manual_seed(seed))

    glob = list(torch.utils.data.BatchSampler(items(0), batch, drop_last=False))
    ranks = [ShardedBatchSampler(items(0), batch, r, world) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert all(len(b) == len(glob) == len(s) for b, s in zip(per_rank, ranks, strict=True))  # same steps everywhere
    for step, g in enumerate(glob):
        shares = [s.share(step) for s in ranks]
        real = [per_rank[r][step][: shares[r][0]] for r in range(world)]
        assert sorted(x for part in real for x in part) == sorted(g)  # the rank shares are the global batch
        assert sum(w for _, w in shares) == pytest.approx(world)  # DDP's mean of weighted losses = global mean
        for r in range(world):
            assert len(per_rank[r][step]) >= 1  # a stand-in item when a short last batch leaves a rank empty
    with pytest.raises(ValueError, match="train.batch_size: 1 is smaller than the 2 processes"):
        ShardedBatchSampler(items(0), 1, 0, 2)


def test_one_process_context():
    ctx = DistContext()
    assert ctx.is_main and not ctx.distributed
    t = torch.ones(2)
    assert ctx.all_reduce_sum(t) is t and ctx.wrap(torch.nn.Linear(1, 1)).__class__ is torch.nn.Linear


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One process of the group, as torchrun would start it (its environment variables), forked so that it
    inherits the test's imports: spawning fresh interpreters costs far more than the tiny training."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from pipelines import ddp

    assert ddp.main(argv) == 0
    sys.stdout.flush()
    sys.stderr.flush()
    # End the fork here: the exit handlers and finalizers it inherited belong to the parent's objects (servers and
    # loaders of tests that ran before, in whatever order), and one failing would fail this rank after its work.
    os._exit(0)


def test_two_gloo_processes_match_one_process(zoo):
    """`torchrun --nproc_per_node 2 -m pipelines.ddp` (gloo, CPU) against `lorax train` in one process."""
    import pandas as pd

    from lorax.continual.state import read_info
    from pipelines.train_stream import run_stream

    root, params = zoo
    one = run_stream(params, params.data.manifests, root / "one")

    raw = yaml.safe_load(PARAMS_YAML.read_text())
    for k, v in {**TINY_OVERRIDES, **DDP_OVERRIDES, "data.root": params.data.root,
                 "data.manifests": params.data.manifests}.items():
        set_by_path(raw, k, v)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    argv = ["--params", str(root / "params.yaml"), "--out", str(root / "two"), "-S", "train.device=cpu"]
    torch.multiprocessing.start_processes(_rank_main, args=(2, _free_port(), argv), nprocs=2, start_method="fork")
    two = read_metrics(root / "two" / "metrics.json")

    for task in params.tasks:  # the same training, up to float summation order
        e1 = read_info(root / "one" / "state" / task)["epochs"]
        e2 = read_info(root / "two" / "state" / task)["epochs"]
        assert len(e1) == len(e2) == 2
        for a, b in zip(e1, e2, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
            assert b["train_acc"] == pytest.approx(a["train_acc"], abs=1e-6)
    for key in ("aa", "aaf", "bwt", "binary_acc"):
        assert two[key] == pytest.approx(one[key], abs=1e-6)
    assert two["acc_matrix"] == one["acc_matrix"]
    for task in params.tasks:  # the same exemplars: selection is global (rank 0, all rows)
        mem1 = pd.read_parquet(root / "one" / "memory" / f"{task}.parquet")
        mem2 = pd.read_parquet(root / "two" / "memory" / f"{task}.parquet")
        assert len(mem1) and mem1["path"].tolist() == mem2["path"].tolist()


def test_the_old_torchrun_spelling_still_runs_the_entry_point():
    """``-m lorax.continual.ddp`` (docs before the split) reaches pipelines.ddp's argument parser."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "lorax.continual.ddp", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "torchrun --nproc_per_node N -m pipelines.ddp" in res.stdout
