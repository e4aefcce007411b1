"""``lorax models list|promote|rollback``: the registered versions (tasks, parent, gate, aliases) and moving the
champion by hand, with the reason recorded on the versions and in the model card."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.cli.settings import add_settings_arguments


def add_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="registered model versions (MLflow registry)")
    msub = m.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", help="versions of tracking.registered_model: tasks, parent, gate, aliases")
    _common(ls)
    ls.add_argument("--json", action="store_true", help="a JSON list of objects (version, aliases, tasks, parent, "
                                                        "aaf, gate, gate_figures, ...)")
    ls.set_defaults(func=_list)
    pr = msub.add_parser("promote", help="make VERSION the champion (overrides the gate; the reason is recorded)")
    pr.add_argument("version", type=int)
    pr.add_argument("--reason", required=True, help="why: kept as the version's 'promoted' tag and in its card")
    _common(pr)
    pr.set_defaults(func=_promote)
    rb = msub.add_parser("rollback", help="give the champion alias back to the version the champion replaced")
    rb.add_argument("--to", type=int, help="another version to return to (default: the champion's champion_before)")
    rb.add_argument("--reason", required=True, help="why: kept as tags and in the new champion's card")
    _common(rb)
    rb.set_defaults(func=_rollback)


def _common(p: argparse.ArgumentParser) -> None:
    add_settings_arguments(p, overrides=False)
    p.add_argument("--root", default=".", help="project root (the default sqlite store lives there)")


def _tracker(args: argparse.Namespace):
    from lorax.config import load_params
    from pipelines.tracking.tracker import Tracker
    from pipelines.tracking.uri import TrackingUnavailable

    params = load_params(Path(args.root) / args.params)
    try:
        return Tracker(params, args.root)
    except TrackingUnavailable as e:
        print(f"lorax: error: {e}", file=sys.stderr)
        return None


def _list(args: argparse.Namespace) -> int:
    from pipelines.tracking.model_registry import list_versions

    tracker = _tracker(args)
    if tracker is None:
        return 2
    name = tracker.params.tracking.registered_model
    versions = list_versions(tracker.client, name)
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    if not versions:
        print(f"no versions of {name} in {tracker.uri} yet; run `dvc repro` (or `lorax demo`)")
        return 0
    print(f"{name} in {tracker.uri}")
    print(format_versions(versions))
    return 0


def format_versions(versions: list[dict]) -> str:
    """The versions as a table: parent, aliases, gate, pooled accuracy on the union (candidate vs the champion it
    was compared with), tasks; then why the last refusals and hand moves happened."""
    out = [f"{'version':>7} {'parent':>6}  {'aliases':<10} {'gate':<7} {'union':>11}  {'n':>2}  tasks"]
    for v in versions:
        f = v.get("gate_figures") or {}
        union = (f"{f['pooled']['candidate']:.1f}/{f['pooled']['champion']:.1f}" if f.get("pooled") else "-")
        out.append(f"{v['version']:>7} {v.get('parent') or '-':>6}  {','.join(v['aliases']) or '-':<10} "
                   f"{v['gate'] or '-':<7} {union:>11}  {len(v['tasks']):>2}  {','.join(v['tasks'])}")
    out.append("union: pooled accuracy (%) on the val images of every task either model knows, this version / the "
               "champion it was compared with")
    for v in [v for v in versions if v["gate"] == "failed"][-3:]:
        out.append(f"  v{v['version']} gate failed: {v['gate_reason']}")
    for v in versions:
        for key in ("promoted", "demoted"):
            if v.get(key):
                out.append(f"  v{v['version']} {key}: {v[key]}")
    return "\n".join(out)


def _promote(args: argparse.Namespace) -> int:
    return _move(args, args.version, "promote")


def _rollback(args: argparse.Namespace) -> int:
    from pipelines.tracking.champion_moves import rollback_target

    tracker = _tracker(args)
    if tracker is None:
        return 2
    try:
        target = args.to or rollback_target(tracker.client, tracker.params.tracking.registered_model)
    except ValueError as e:
        print(f"lorax: error: {e}", file=sys.stderr)
        return 2
    return _move(args, target, "rollback", tracker)


def _move(args: argparse.Namespace, version: int, action: str, tracker=None) -> int:
    from pipelines.tracking.champion_moves import move_champion

    tracker = tracker or _tracker(args)
    if tracker is None:
        return 2
    try:
        rec = move_champion(tracker, version, args.reason, action=action)
    except ValueError as e:
        print(f"lorax: error: {e}", file=sys.stderr)
        return 2
    name = tracker.params.tracking.registered_model
    print(f"{name}: champion is now version {rec['version']} (tasks {','.join(rec['tasks'])}; was "
          f"{rec['champion_before'] or 'none'}). A running `lorax serve` follows within its poll interval.")
    return 0
