"""The CLIP-MoLE ablation table in one command: ``python -m benchmarks.detect_ablation`` (also
``lorax detect-ablation``).

Three tables, as in the paper (Tables 4-6), each one factor away from the reference detector (``detect.*``: MoLE on
the MLP of the last 3 blocks, shared rank 8, experts 4/8/16):

* ``design``: the methods (``probe`` = UnivFD's linear probe, ``shared`` = one LoRA, ``separate`` = routed experts
  only, ``mole``) and where the adapters go (``mlp``/``attn``/``both``, for ``--where-methods``; the paper's
  Table 5 uses the shared LoRA);
* ``blocks``: MoLE in the last k blocks (``all`` = every block);
* ``ranks``: MoLE rank sets ``SHARED:E1/E2/...`` (``8:4/8/16`` = shared rank 8, experts 4, 8, 16).

Every distinct detector runs once per seed (a row shared by two tables is not retrained) through
:func:`~lorax.detect.runner.run_detect`, into ``OUT/runs/<variant>/seed<k>/``; a finished run with the same settings
is reused, so an interrupted ablation resumes where it stopped. Robustness curves are skipped unless
``--robustness`` (they are not in the table and cost 8 extra evaluations per run). Writes ``OUT/ablation.json``
(settings, command, every run's figures, the tables) and ``OUT/ablation.md`` (the tables: mAP and accuracy on the
unseen generators as mean ± std over seeds, per-generator AP, the training generators' own val mAP, and the mAP on
each ``--eval-extra`` test-only set). Nothing is tuned: every variant uses the same settings apart from its factor.
The variants and the tables' rendering are in :mod:`benchmarks.detect_ablation_tables`; MLflow logging (``--track``)
is the pipeline's (:mod:`pipelines.detect_runs`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.detect_ablation_tables import (
    GROUPS,
    METHODS,
    PAPER_BLOCKS,
    PAPER_RANKS,
    WHERE,
    Variant,
    ablation_grid,
    chance_map,
    parse_blocks,
    parse_rank_set,
    render_markdown,
    summarize_runs,
)
from lorax.config import Params, params_to_dict
from pipelines.cli.settings import add_settings_arguments

__all__ = ["GROUPS", "PAPER_RANKS", "Variant", "ablation_grid", "add_commands", "main", "parse_blocks",
           "parse_rank_set", "render_markdown", "run_ablation"]

log = logging.getLogger(__name__)

RUN_FILE = "ablation_run.json"  # in each run folder: the settings it ran with (a resumed ablation reuses it)


def _settings(params: Params, variant: Variant, seed: int, manifests: Path, train_tasks: list[str],
              extra: dict[str, Path]) -> dict[str, Any]:
    from lorax.detect.runner import detect_params

    d = params_to_dict(detect_params(params))
    return {"variant": asdict(variant), "seed": seed, "model": d["model"], "detect": d["detect"],
            "eval": d["eval"], "manifests": str(manifests.resolve()), "train_tasks": train_tasks,
            "extra": {k: str(Path(v).resolve()) for k, v in sorted(extra.items())}}


def _one_run(params: Params, variant: Variant, seed: int, manifests: Path, train_tasks: list[str],
             extra: dict[str, Path], out: Path, tracker=None, parent_run_id: str | None = None) -> dict[str, Any]:
    from lorax.config import ConfigError, parse_params
    from pipelines.detect_runs import tracked_run_detect

    d = params_to_dict(params)
    d["seed"] = seed
    for k, v in variant.overrides().items():
        d["detect"][k.split(".", 1)[1]] = v
    try:
        run_params = parse_params(d)
    except ConfigError as e:
        raise ValueError(f"ablation variant {variant.slug}: {e}") from None
    settings = json.loads(json.dumps(_settings(run_params, variant, seed, manifests, train_tasks, extra)))
    marker, metrics_file = out / RUN_FILE, out / "metrics.json"
    if marker.is_file() and metrics_file.is_file() and json.loads(marker.read_text()) == settings:
        log.info("ablation: %s seed %d is done (%s); reused", variant.slug, seed, out)
        return json.loads(metrics_file.read_text())
    marker.unlink(missing_ok=True)
    log.info("ablation: running %s seed %d -> %s", variant.slug, seed, out)
    metrics = tracked_run_detect(run_params, manifests, out, tracker, method=variant.method,
                                 train_tasks=train_tasks, extra_eval=extra, parent_run_id=parent_run_id,
                                 run_name=f"{variant.slug}-seed{seed}", tags={"lorax.ablation": variant.slug})
    marker.write_text(json.dumps(settings, indent=2) + "\n")
    return metrics



def run_ablation(
    params: Params,
    manifests_dir: str | Path,
    out_dir: str | Path,
    tables: dict[str, list[Variant]] | None = None,
    seeds: Sequence[int] = (0,),
    train_tasks: list[str] | None = None,
    extra_eval: dict[str, str | Path] | None = None,
    robustness: bool = False,
    tracker=None,
    command: str | None = None,
    runs_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run every variant of ``tables`` (default: the full paper grid) for each seed; write ablation.json/.md.

    Each run lives in ``runs_dir/<variant>/seed<k>`` (default ``out_dir/runs``); ablations that share ``runs_dir``
    and their settings share their runs (e.g. more seeds for one table).
    """
    from lorax.detect.runner import list_manifests

    tables = tables or ablation_grid(params)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("--seeds: give at least one seed, e.g. --seeds 0 or --seeds 0,1,2")
    manifests = Path(manifests_dir)
    found = list_manifests(manifests)
    train_tasks = list(train_tasks or params.detect.train_tasks)
    missing = [t for t in train_tasks if t not in found]
    if missing:
        raise FileNotFoundError(f"{manifests}: no manifest for training generator(s) {missing}; found {sorted(found)}")
    extra = {k: Path(v) for k, v in (extra_eval or {}).items()}
    for name, folder in extra.items():
        list_manifests(folder)  # fail before hours of training
    if not robustness:
        params = params.model_copy(update={"detect": params.detect.model_copy(
            update={"blur_sigmas": [], "jpeg_qualities": []})})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_root = Path(runs_dir) if runs_dir is not None else out / "runs"
    unique: list[Variant] = []
    for rows in tables.values():
        unique += [v for v in rows if v not in unique]
    ref = Variant("mole", params.detect.where, params.detect.blocks, params.detect.shared_rank,
                  tuple(params.detect.expert_ranks))
    if ref in unique:  # the reference first: its row is in every table
        unique.remove(ref)
        unique.insert(0, ref)
    parent = None
    if tracker is not None:
        from pipelines.detect_runs import detect_experiment

        tracker.experiment, tracker._experiment_id = detect_experiment(params), None
        parent = tracker.client.create_run(tracker.experiment_id, run_name=f"ablation-{out.name}",
                                           tags={"lorax.kind": "detect-ablation"}).info.run_id
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    total = len(unique) * len(seeds)
    try:
        for i, v in enumerate(unique):
            per_seed = []
            for seed in seeds:
                log.info("ablation: run %d/%d", len(runs) * len(seeds) + len(per_seed) + 1, total)
                m = _one_run(params, v, seed, manifests, train_tasks, extra, runs_root / v.slug / f"seed{seed}",
                             tracker, parent)
                per_seed.append({**m, "seed": seed})
            runs[v.slug] = per_seed
            results[v.slug] = summarize_runs(v, per_seed)
            _write(out, params, tables, results, runs, seeds, train_tasks, extra, command, time.perf_counter() - t0)
    finally:
        if parent is not None:
            tracker.finish(parent)
    summary = _write(out, params, tables, results, runs, seeds, train_tasks, extra, command, time.perf_counter() - t0)
    if tracker is not None:
        tracker.log_artifact(parent, out / "ablation.md")
        tracker.log_artifact(parent, out / "ablation.json")
    return summary


def _write(out: Path, params: Params, tables: dict[str, list[Variant]], results: dict[str, dict[str, Any]],
           runs: dict[str, list[dict[str, Any]]], seeds: list[int], train_tasks: list[str], extra: dict[str, Path],
           command: str | None, seconds: float) -> dict[str, Any]:
    """ablation.json + ablation.md with every finished row (rewritten after each variant: partial tables show)."""
    from lorax.detect.runner import detect_params

    first = next(iter(runs.values()))[0] if runs else {}
    resolved = detect_params(params)
    summary = {
        "command": command,
        "backbone": resolved.model.backbone,
        "pretrained": resolved.model.pretrained,
        "img_size": resolved.model.img_size,
        "epochs": params.detect.epochs,
        "seeds": seeds,
        "train_tasks": train_tasks,
        "eval_tasks": first.get("eval_tasks", []),
        "extra_sets": {k: str(v) for k, v in extra.items()},
        "reference": {k: getattr(params.detect, k) for k in ("where", "blocks", "shared_rank", "expert_ranks",
                                                              "balance_weight", "lr", "batch_size", "aug_prob")},
        "chance_map": chance_map(first),
        "tables": {g: [v.slug for v in rows] for g, rows in tables.items()},
        "rows": results,
        "complete": all(v.slug in results for rows in tables.values() for v in rows),
        "seconds": seconds,
    }
    (out / "ablation.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (out / "ablation.md").write_text(render_markdown(summary, tables))
    return summary



# ------------------------------------------------------------------------------------------------------- command
def _csv(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifests", help="manifest folder (default: data.manifests)")
    p.add_argument("--out", required=True, help="output folder (ablation.md, ablation.json, runs/)")
    p.add_argument("--runs", help="folder of the individual runs (default: OUT/runs); share it between ablations "
                                  "to reuse runs")
    p.add_argument("--train-tasks", help="comma-separated training generators (default: detect.train_tasks)")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"tables to run (default: {','.join(GROUPS)})")
    p.add_argument("--methods", default=",".join(METHODS), help="design table: detectors (default: all four)")
    p.add_argument("--where", default=",".join(WHERE), help="design table: adapted layers (default: mlp,attn,both)")
    p.add_argument("--where-methods", default="shared,mole",
                   help="design table: methods tried at the non-reference --where values (default: shared,mole)")
    p.add_argument("--blocks", default=",".join(PAPER_BLOCKS), help="blocks table: last k blocks or 'all' "
                                                                      "(default: 1,2,3,4,5,all)")
    p.add_argument("--ranks", default=",".join(PAPER_RANKS),
                   help="ranks table: SHARED:E1/E2/... sets (default: the paper's Table 6)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; figures are mean ± std over them")
    p.add_argument("--eval-extra", action="append", default=[], metavar="NAME=DIR",
                   help="also score every image of every manifest in DIR (test-only, e.g. the real-world set); "
                        "a column per set; repeatable")
    p.add_argument("--robustness", action="store_true", help="also compute the blur/JPEG robustness curves")
    p.add_argument("--track", action="store_true", help="log every run to MLflow (nested under an ablation run)")
    add_settings_arguments(p)  # -S: for every variant


def run_command(args: argparse.Namespace) -> int:
    from pipelines.cli.settings import params_from_arguments
    from pipelines.cli.detect import parse_eval_extra

    params = params_from_arguments(args)
    tables = ablation_grid(params, groups=_csv(args.groups), methods=_csv(args.methods), where=_csv(args.where),
                           where_methods=_csv(args.where_methods), blocks=_csv(args.blocks), ranks=_csv(args.ranks))
    try:
        seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    extra = parse_eval_extra(args.eval_extra)
    tracker = None
    if args.track:
        from pipelines.tracking.tracker import Tracker

        tracker = Tracker(params)
    train_tasks = _csv(args.train_tasks)
    command = _command_line(args)
    summary = run_ablation(params, Path(args.manifests or params.data.manifests), Path(args.out), tables, seeds,
                           train_tasks or None, extra, args.robustness, tracker, command, args.runs)
    print((Path(args.out) / "ablation.md").read_text())
    print(f"ablation: {Path(args.out) / 'ablation.md'}, {Path(args.out) / 'ablation.json'} "
          f"({len(summary['rows'])} variants x {len(seeds)} seeds, {summary['seconds']:.0f} s)")
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this ablation: every option that differs from its default, in a fixed order."""
    defaults = vars(_parser().parse_args(["--out", "x"]))
    parts = ["python -m benchmarks.detect_ablation"]
    for dest in ("manifests", "out", "runs", "train_tasks", "groups", "methods", "where", "where_methods", "blocks",
                 "ranks", "seeds", "params"):
        v = getattr(args, dest)
        if v is not None and (dest == "out" or v != defaults[dest]):
            parts += [f"--{dest.replace('_', '-')}", shlex.quote(str(v))]
    parts += [f"--eval-extra {shlex.quote(e)}" for e in args.eval_extra]
    parts += [f"--{flag}" for flag in ("robustness", "track") if getattr(args, flag)]
    parts += [f"-S {shlex.quote(item)}" for item in args.set]
    return " ".join(parts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.detect_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect-ablation", help="reproduce the CLIP-MoLE ablation table (methods, where, blocks, "
                                               "ranks) on a manifest folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_command)


def main(argv: list[str] | None = None) -> int:
    import os

    from lorax.config import ConfigError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run_command(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ablation: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
