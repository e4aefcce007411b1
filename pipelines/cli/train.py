"""``lorax train``: a whole stream from manifests in one process, the steps of the pipeline without tracking."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.cli.settings import add_settings_arguments

if TYPE_CHECKING:
    from lorax.config import Params

METHOD_HELP = "continual method (default: continual.method): lorax, finetune, der, joint, probe, trace, lorax+trace"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the stream of params.yaml from manifests (one process) and report metrics")
    add_settings_arguments(p, method=METHOD_HELP)
    p.add_argument("--manifests", help="manifest folder (default: data.manifests)")
    p.add_argument("--out", required=True, help="output folder: state/, memory/, eval/, metrics.json, plots/")
    p.set_defaults(func=_train)


def check_method(params: Params) -> None:
    """Fail before any work on an unknown continual method, listing the known ones."""
    from lorax.config import ConfigError
    from lorax.continual.trace_methods import METHODS  # registers the methods (with trace, lorax+trace)

    if params.continual.method not in METHODS:
        raise ConfigError(f"continual.method (--method): unknown method {params.continual.method!r}; "
                          f"allowed: {', '.join(METHODS.names())}")


def _train(args: argparse.Namespace) -> int:
    from pipelines.cli.settings import params_from_arguments
    from pipelines.summary_table import format_stream
    from pipelines.layout import Layout
    from pipelines.train_stream import prepare_missing, run_stream

    params = params_from_arguments(args, "continual.method")
    check_method(params)
    manifests = Path(args.manifests or params.data.manifests)
    prepare_missing(params, Layout.run(params, args.out, manifests))
    metrics = run_stream(params, manifests, Path(args.out))
    print(format_stream(metrics))
    print(f"metrics: {Path(args.out) / 'metrics.json'} (details: {Path(args.out) / 'metrics_details.json'})")
    print(json.dumps({k: metrics[k] for k in ("aa", "aaf", "bwt", "forgetting", "binary_acc")}))
    return 0
