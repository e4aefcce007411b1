"""``lorax models list``: the registered versions with their tasks, accuracy, gate result and aliases."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorax.config import add_settings_arguments


def add_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="registered model versions (MLflow registry)")
    msub = m.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", help="versions of tracking.registered_model: tasks, AAF, gate, aliases")
    add_settings_arguments(ls, overrides=False)
    ls.add_argument("--root", default=".", help="project root (the default sqlite store lives there)")
    ls.add_argument("--json", action="store_true", help="a JSON list of objects (version, aliases, tasks, aaf, gate, ...)")
    ls.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    import sys

    from lorax.config import load_params
    from pipelines.tracking.model_registry import list_versions
    from pipelines.tracking.tracker import Tracker
    from pipelines.tracking.uri import TrackingUnavailable

    params = load_params(Path(args.root) / args.params)
    try:
        tracker = Tracker(params, args.root)
    except TrackingUnavailable as e:
        print(f"lorax: error: {e}", file=sys.stderr)
        return 2
    name = params.tracking.registered_model
    versions = list_versions(tracker.client, name)
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    if not versions:
        print(f"no versions of {name} in {tracker.uri} yet; run `dvc repro` (or `lorax demo`)")
        return 0
    print(f"{name} in {tracker.uri}")
    print(f"{'version':>7}  {'aliases':<10} {'gate':<7} {'AAF':>6}  {'n':>2}  tasks")
    for v in versions:
        aaf = f"{v['aaf']:.2f}" if v["aaf"] is not None else "-"
        print(f"{v['version']:>7}  {','.join(v['aliases']) or '-':<10} {v['gate'] or '-':<7} {aaf:>6}  "
              f"{len(v['tasks']):>2}  {','.join(v['tasks'])}")
    failed = [v for v in versions if v["gate"] == "failed"]
    for v in failed[-3:]:
        print(f"  v{v['version']} gate failed: {v['gate_reason']}")
    return 0
