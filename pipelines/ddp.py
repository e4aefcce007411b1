"""``lorax train`` data-parallel over the processes torchrun starts (GPUs or CPU cores, one or many nodes).

    torchrun --nproc_per_node N -m pipelines.ddp --out runs/x [--params params.yaml] [-S key=value ...]

Same arguments, steps and outputs as ``lorax train`` (:mod:`pipelines.train_stream`). Every process runs the train step
of every task on its share of each batch (:mod:`lorax.continual.distributed`); rank 0 alone runs the select and
evaluate steps and writes (state, memory, metrics), and the others wait at a barrier and read what it wrote, so
``--out`` must be on a filesystem all nodes share (see docs/cluster.md). ``-m lorax.continual.ddp``, the old
spelling, still works.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lorax.config import Params


def run_stream_distributed(params: Params, manifests: str | Path, out: str | Path) -> dict[str, Any] | None:
    """``run_stream`` for every process of the group: all train, rank 0 selects, evaluates and reports.

    Returns the metrics in rank 0, None elsewhere.
    """
    from lorax.continual.distributed import init_from_env
    from pipelines.layout import Layout
    from pipelines.publish import report_step
    from pipelines.steps import evaluate_step, select_step, train_step

    ctx = init_from_env(params.train.device)
    layout = Layout.run(params, out, manifests)
    for task in params.tasks:
        # every rank: its share of each batch; rank 0 writes the state and holds the task's lock
        train_step(params, layout, task, exclusive=ctx.is_main)
        ctx.barrier()
        if ctx.is_main:
            select_step(params, layout, task)
            evaluate_step(params, layout, task, openset=False)
        ctx.barrier()
    metrics = report_step(params, layout) if ctx.is_main else None
    ctx.barrier()
    return metrics


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from lorax.config import ConfigError
    from pipelines.cli.settings import add_settings_arguments, params_from_arguments
    from pipelines.summary_table import format_stream
    from pipelines.cli.train import METHOD_HELP, check_method

    ap = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m pipelines.ddp",
                                 description="lorax train, data-parallel over the processes torchrun starts")
    add_settings_arguments(ap, method=METHOD_HELP)
    ap.add_argument("--manifests", help="manifest folder (default: data.manifests)")
    ap.add_argument("--out", required=True, help="output folder, on a filesystem every node shares")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        params = params_from_arguments(args, "continual.method")
        check_method(params)
    except (ConfigError, ValueError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        metrics = run_stream_distributed(params, Path(args.manifests or params.data.manifests), Path(args.out))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if metrics is not None:
        print(format_stream(metrics))
        print(f"metrics: {Path(args.out) / 'metrics.json'} (details: {Path(args.out) / 'metrics_details.json'})")
        print(json.dumps({k: metrics[k] for k in ("aa", "aaf", "bwt", "forgetting", "binary_acc")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
