"""``lorax data synth`` and ``lorax data prepare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.settings import add_settings_arguments


def _tasks_arg(value: str | None) -> list[str] | None:
    return [t for t in value.split(",") if t] if value else None


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build the built-in zoo and prepare dataset manifests")
    dsub = data.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("synth", help="synthesise the built-in generator zoo (CDDB layout, deterministic)")
    add_settings_arguments(s, overrides=False)
    s.add_argument("--scenario", help="zoo-N (first N generators of zoo.order); default: the stream's tasks")
    s.add_argument("--tasks", help="comma-separated generator names (instead of --scenario)")
    s.add_argument("--out", help="output root (default: data.root)")
    s.set_defaults(func=_synth)

    p = dsub.add_parser("prepare", help="scan a dataset root and write one parquet manifest per task")
    add_settings_arguments(p, overrides=False)
    p.add_argument("--root", help="dataset root (default: data.root)")
    p.add_argument("--tasks", help="comma-separated tasks in stream order (default: the stream; 'all' = every folder)")
    p.add_argument("--layout", choices=["auto", "cddb", "univfd", "genimage"], help="default: data.layout")
    p.add_argument("--out", help="manifest folder (default: data.manifests)")
    p.add_argument("--strict", action="store_true", help="any bad file is fatal")
    p.set_defaults(func=_prepare)


def _synth(args: argparse.Namespace) -> int:
    from lorax.config import load_params
    from lorax.data import zoo

    params = load_params(args.params)
    tasks = _tasks_arg(args.tasks)
    if tasks is None:
        tasks = zoo.scenario_generators(args.scenario, params.zoo) if args.scenario else params.tasks
    out = Path(args.out or params.data.root)
    counts = zoo.synth_tasks(tasks, out, params.zoo)
    for task, c in counts.items():
        print(f"{task}: {c}")
    print(f"zoo written to {out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from lorax.config import load_params
    from lorax.data import prepare

    params = load_params(args.params)
    data_cfg = params.data.model_copy(update={"strict": params.data.strict or args.strict})
    if args.layout:
        data_cfg = data_cfg.model_copy(update={"layout": args.layout})
    tasks = _tasks_arg(args.tasks)
    if tasks == ["all"]:
        tasks = None
    elif tasks is None:
        tasks = params.tasks
    results = prepare.prepare_tasks(
        root=Path(args.root or params.data.root),
        tasks=tasks,
        out_dir=Path(args.out or params.data.manifests),
        cfg=data_cfg,
        crop=params.model.img_size,
    )
    for r in results:
        print(r.summary())
    return 0
