"""``lorax detect``: train a real/fake detector on some generators, evaluate it on the unseen others."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipelines.cli.settings import add_settings_arguments


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="train a real/fake detector (CLIP-MoLE or a baseline) on some generators and evaluate it on the others",
        description="Train on the train split of --train-tasks, fit the threshold on their val split, evaluate on the "
                    "val split of every other manifest in --manifests. Writes OUT/metrics.json, "
                    "OUT/detector.safetensors, OUT/scores.parquet and OUT/robustness.png.",
    )
    p.add_argument("--train-tasks", help="comma-separated training generators, e.g. deconv or deconv,nnconv "
                                         "(default: detect.train_tasks)")
    p.add_argument("--manifests", help="manifest folder (default: data.manifests)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--eval-extra", action="append", default=[], metavar="NAME=DIR",
                   help="also score every image of every manifest in DIR (a test-only set, e.g. the real-world "
                        "images prepared with `lorax data prepare`), reported under extra.NAME; repeatable")
    add_settings_arguments(p, method="mole | probe | shared | separate (default: detect.method)")
    p.add_argument("--track", action="store_true",
                   help="log the run to MLflow (experiment <tracking.experiment>-detect, tracking.uri)")
    p.set_defaults(func=_detect)

    ab = sub.add_parser("detect-ablation", add_help=False, prefix_chars="\0",
                        help="the CLIP-MoLE ablation table: runs `python -m benchmarks.detect_ablation ARGS` from a "
                             "checkout of the repository (the experiment grid lives in benchmarks/)")
    ab.add_argument("argv", nargs=argparse.REMAINDER)
    ab.set_defaults(func=_ablation)


def _ablation(args: argparse.Namespace) -> int:
    """``lorax detect-ablation ARGS``: the benchmark as its own process, so the command never imports benchmarks/
    (which sits on top of the library and the pipelines, and is not installed)."""
    if not (Path.cwd() / "benchmarks" / "detect_ablation.py").is_file():
        raise FileNotFoundError("lorax detect-ablation: run it from the project root of a checkout (it runs "
                                "benchmarks/detect_ablation.py), or run `python -m benchmarks.detect_ablation` there")
    return subprocess.call([sys.executable, "-m", "benchmarks.detect_ablation", *args.argv])


def parse_eval_extra(items: list[str]) -> dict[str, Path]:
    """``--eval-extra NAME=DIR`` (repeatable): test-only manifest folders, by name."""
    extra = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ValueError(f"--eval-extra {item!r}: expected NAME=DIR, e.g. realworld=data/realworld_manifests")
        extra[name.strip()] = Path(folder.strip())
    return extra


def _detect(args: argparse.Namespace) -> int:
    from pipelines.cli.settings import params_from_arguments
    from lorax.detect.runner import run_detect

    overrides = {}
    if args.train_tasks is not None:
        tasks = [t.strip() for t in args.train_tasks.split(",") if t.strip()]
        if not tasks:
            raise ValueError("--train-tasks: give at least one generator name, e.g. --train-tasks deconv")
        overrides["detect.train_tasks"] = tasks
    extra = parse_eval_extra(args.eval_extra)
    params = params_from_arguments(args, "detect.method", overrides)  # validates method, ranks, ... naming the key
    manifests = Path(args.manifests or params.data.manifests)
    if args.track:
        from pipelines.tracking.tracker import Tracker
        from pipelines.tracking.uri import TrackingUnavailable
        from pipelines.detect_runs import tracked_run_detect

        try:
            tracker = Tracker(params)
        except TrackingUnavailable as e:
            raise ValueError(f"--track: {e}") from None
        metrics = tracked_run_detect(params, manifests, Path(args.out), tracker, extra_eval=extra)
        print(f"MLflow run: {metrics['mlflow_run_id']}")
    else:
        metrics = run_detect(params, manifests, Path(args.out), extra_eval=extra)
    print(f"{'generator':<16} {'AP':>7} {'acc':>7} {'real':>7} {'fake':>7}")
    for name, m in metrics["per_generator"].items():
        print(f"{name:<16} " + " ".join(f"{_f(m[k]):>7}" for k in ("ap", "acc", "real_acc", "fake_acc")))
    print(f"{'mean':<16} {_f(metrics['map']):>7} {_f(metrics['mean_acc']):>7}")
    for name, res in metrics["extra"].items():
        print(f"{name}: mAP {_f(res['map'])}, mean acc {_f(res['mean_acc'])} over {len(res['per_generator'])} "
              "generators")
    print(json.dumps({"robustness": metrics["robustness"], "threshold": round(metrics["threshold"], 4)}))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
