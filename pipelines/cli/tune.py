"""``lorax tune``: choose settings by grouped cross-validation on the train split of the stream's first tasks
(:mod:`pipelines.tune`) and write the params file with them (:mod:`pipelines.tune_report`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipelines.cli.settings import add_settings_arguments


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="choose the tune.grid settings by grouped CV on the train split (val never read); write P2",
        description="Runs the stream of `lorax train` on grouped folds of the train split of the first tune.tasks "
        "tasks for each setting of tune.grid (the full product when small, else one key at a time), and writes "
        "--out: the --params file with the best setting (comments kept). -S overrides apply to the tuning runs "
        "(e.g. -S train.epochs=2, -S 'tune.grid={model.img_size: [112, 224]}'), not to --out.")
    add_settings_arguments(p)
    p.add_argument("--manifests", help="manifest folder (default: data.manifests); prepared beforehand")
    p.add_argument("--out", required=True, help="the tuned params file to write (P2); its table beside it "
                   "(P2 stem + .tune.json / .tune.csv)")
    p.add_argument("--work", help="folder of the fold manifests and of each run's output (default: P2 stem + "
                   ".tune/ beside P2); a re-run reuses the runs it finds there")
    p.add_argument("--no-track", action="store_true", help="do not log the table to MLflow")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    from pipelines.cli.settings import parse_overrides

    run_tune(args.params, Path(args.out), parse_overrides(args.set), manifests=args.manifests,
             work=Path(args.work) if args.work else None, track=not args.no_track)
    return 0


def run_tune(params_file: str | Path, out: Path, overrides: dict[str, Any], manifests: str | Path | None = None,
             work: Path | None = None, track: bool = True) -> dict[str, Any]:
    """Tune ``params_file`` (with ``overrides`` for the tuning runs) and write ``out`` (may be ``params_file``
    itself: only the chosen keys change); print and save the table, log it to MLflow when ``track``. The one path
    of ``lorax tune`` and ``lorax init --tune``; returns the chosen settings."""
    from lorax.config import load_params
    from pipelines.cli.train import check_method
    from pipelines.tune import tune
    from pipelines.tune_report import format_table, log_to_mlflow, table_files, write_tuned_params

    params = load_params(params_file, overrides)
    check_method(params)
    work = work or out.with_name(out.with_suffix("").name + ".tune")
    result = tune(params, Path(manifests or params.data.manifests), work)
    write_tuned_params(params_file, out, result, overrides)
    json_file, csv_file = table_files(result, out)
    print(format_table(result))
    changed = {k: v for k, v in result.chosen.items() if result.start.get(k) != v}
    print(f"chosen: {result.chosen} ({'changed: ' + str(changed) if changed else 'the params already held it'})")
    print(f"tuned params: {out}; table: {json_file}, {csv_file}; runs: {work}")
    if track:
        run_id, uri = log_to_mlflow(params, result, [json_file, csv_file, out])
        print(f"MLflow run {run_id} in {uri}")
    return result.chosen
