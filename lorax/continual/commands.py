"""``lorax train``: a whole stream from manifests in one process (no orchestration)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorax.config import Params


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the stream of params.yaml from manifests (one process) and report metrics")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--manifests", help="manifest folder (default: data.manifests)")
    p.add_argument("--out", required=True, help="output folder: state/, memory/, eval/, metrics.json, plots")
    p.add_argument("--method", help="continual method (default: continual.method): lorax, finetune, der, joint, probe")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. -S train.epochs=2 (YAML value)")
    p.set_defaults(func=_train)


def parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"-S {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def prepare_missing(params: Params, manifests: Path) -> list[str]:
    """With ``data.source: folder``, prepare (``lorax data prepare``) the stream's tasks that have no manifest in
    ``manifests`` yet, from ``data.root``, so that ``lorax train`` runs on a fresh CDDB-layout folder; returns them.
    The built-in zoo is synthesised and prepared by ``lorax data synth`` / ``prepare`` (or ``dvc repro``)."""
    from lorax.data.manifest import manifest_path
    from lorax.data.prepare import prepare_task

    todo = [t for t in params.tasks if not manifest_path(manifests, t).is_file()]
    if params.data.source != "folder" or not todo:
        return []
    root = Path(params.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder; set -S data.root=DATASET (one folder per task, "
                                "CDDB layout TASK/{train,val}/{0_real,1_fake})")
    absent = [t for t in todo if not (root / t).is_dir()]
    if absent:  # before any work
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"stream: task folders {absent} not found in data.root {root} (found: {found}); "
                                "fix the stream or data.root")
    for t in todo:
        res = prepare_task(root, t, params.tasks.index(t), manifests, params.data, params.model.img_size)
        print(res.summary())
    return todo


def _train(args: argparse.Namespace) -> int:
    from lorax.config import ConfigError, load_params
    from lorax.continual.stream import format_matrix, run_stream
    from lorax.registry import METHODS
    import lorax.continual.methods  # noqa: F401  (registers the methods)

    overrides = parse_overrides(args.set)
    if args.method:
        overrides["continual.method"] = args.method
    params = load_params(args.params, overrides)
    if params.continual.method not in METHODS:  # fail early on an unknown method, listing the known ones
        raise ConfigError(f"continual.method (--method): unknown method {params.continual.method!r}; "
                          f"allowed: {', '.join(METHODS.names())}")
    manifests = Path(args.manifests or params.data.manifests)
    prepare_missing(params, manifests)
    metrics = run_stream(params, manifests, Path(args.out))
    print(format_matrix(metrics))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    print(json.dumps({k: metrics[k] for k in ("aa", "aaf", "bwt", "forgetting", "binary_acc")}))
    return 0
