"""``lorax init``, ``lorax stream add``, ``lorax schedule`` and ``lorax demo``: the operational entry points.

Nothing here imports DVC or Prefect; ``demo`` and ``schedule`` run them as subprocesses
(``dvc repro``, ``python -m pipelines.flows serve``) with this interpreter's ``bin/`` first on PATH, so the DVC
stages' ``python`` is the project's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lorax.config import ConfigError
from pipelines.cli.settings import add_settings_arguments, parse_overrides
from pipelines.init_params import PROFILES


def add_commands(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("stream", help="the continual stream of params.yaml")
    ssub = st.add_subparsers(dest="stream_command", required=True)
    add = ssub.add_parser("add", help="append a task (zoo generator or folder under data.root); then `dvc repro`")
    add.add_argument("name", nargs="?", help="task name (a zoo generator, or a folder under data.root)")
    add.add_argument("--next", action="store_true", help="the next zoo generator (zoo.order) not yet in the stream")
    add_settings_arguments(add, overrides=False)
    add.set_defaults(func=_stream_add)

    sch = sub.add_parser("schedule", help="serve the watch flow (learn new task folders) on an interval, via Prefect")
    sch.add_argument("--every", default="1h", help="interval: 90, 30s, 15m, 1h, 1d (default 1h)")
    add_settings_arguments(sch, overrides=False)
    sch.add_argument("--root", default=".")
    sch.set_defaults(func=_schedule)

    ini = sub.add_parser("init", help="write params.yaml for your own folder of task folders; then `dvc repro`")
    ini.add_argument("--root", required=True, help="the folder with one folder per task, "
                     "<task>/{train,val}/{0_real,1_fake}/")
    ini.add_argument("--tasks", help="comma-separated task folders, in stream order (default: every one, by name)")
    ini.add_argument("--profile", default="realworld", choices=sorted(PROFILES),
                     help="settings to start from: realworld (params.realworld.yaml: real images) | zoo = default "
                     "(params.yaml's built-in settings) (default: %(default)s)")
    ini.add_argument("--params", default="params.yaml", help="the file to write (default: %(default)s)")
    ini.add_argument("--force", action="store_true", help="replace the params of a stream that has already run "
                     "(a copy is kept as params.yaml.bak)")
    ini.add_argument("--tune", action="store_true", help="then choose the profile's tune.grid on your folder's train "
                     "split (`lorax tune`, val never read) and write the chosen settings into --params; run it from "
                     "the project root")
    ini.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                     help="with --tune: a setting of the tuning runs only, e.g. -S train.epochs=2 (repeatable)")
    ini.add_argument("--no-track", action="store_true", help="with --tune: do not log the table to MLflow")
    ini.set_defaults(func=_init)

    demo = sub.add_parser("demo", help="the main job: `dvc repro` of the built-in zoo, then where to look")
    demo.add_argument("--force", action="store_true", help="re-run every stage (dvc repro --force)")
    demo.set_defaults(func=_demo)


def tool_env() -> dict[str, str]:
    """Environment for DVC/Prefect subprocesses: this interpreter's bin/ first, no telemetry, offline hubs."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for k, v in {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}.items():
        env.setdefault(k, v)
    return env


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def ensure_dvc(root: Path) -> bool:
    """``dvc init`` in a project (a fresh clone) that has dvc.yaml but no .dvc/ yet; True when it ran."""
    if (root / ".dvc").is_dir():
        return False
    scm = [] if (root / ".git").exists() else ["--no-scm"]
    subprocess.run([_tool("dvc"), "init", "-q", *scm], cwd=root, check=True, env=tool_env())
    return True


def _init(args: argparse.Namespace) -> int:
    from pipelines.init_params import init_params

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    command = shlex.join(["lorax", "init", "--root", args.root] + (["--tasks", args.tasks] if args.tasks else [])
                         + ["--profile", args.profile] + (["--tune"] if args.tune else []))
    if args.set and not args.tune:
        raise ConfigError("-S: settings of the tuning runs; give --tune too (or edit the written params file)")
    project_dir = Path(args.params).resolve().parent
    if args.tune and project_dir != Path.cwd().resolve():
        raise ConfigError(f"--tune runs from the project root: cd {project_dir} and run `lorax init` there "
                          "(the params' relative folders are read from there)")
    res = init_params(args.params, args.root, tasks, args.profile, args.force, command)
    p = res.params
    project = res.path.resolve().parent
    source = res.profile_file.name if res.profile_file.parent == project else res.profile_file
    print(f"wrote {res.path} from {source}: data.root {p.data.root}, stream {' -> '.join(p.tasks)}, "
          f"tracking.scenario {p.tracking.scenario} (MLflow experiment "
          f"{p.tracking.experiment.format(scenario=p.tracking.scenario)}), detect.train_tasks {p.detect.train_tasks}, "
          f"manifests in {p.data.manifests}")
    for note in res.notes:
        print(f"note: {note}")
    if not (project / "dvc.yaml").is_file():
        print(f"note: no dvc.yaml in {project}: `dvc repro` runs from the project root (or `lorax train --params "
              f"{res.path} --manifests DIR --out OUT` without DVC)")
    elif ensure_dvc(project):
        print(f"ran `dvc init` in {project} (there was no .dvc/)")
    if args.tune:
        tune_written(res.path, parse_overrides(args.set), track=not args.no_track)
    print("Next:\n"
          "  dvc repro                 # prepares every task's manifest, trains the stream, registers the champion\n"
          "  lorax stream add NAME     # when a new task folder NAME appears under data.root; then `dvc repro`\n"
          "  lorax models list         # the registered versions and the champion\n"
          "  dvc repro pipelines/detection/dvc.yaml   # optional: the real/fake detector, trained on the first task")
    return 0


def tune_written(params_file: Path, overrides: dict, track: bool = True) -> dict:
    """``lorax init --tune``: prepare the tuned tasks' manifests under the tune's work folder (``<stem>.tune/``, not
    the pipeline's own, so `dvc repro` still prepares its stages), then ``lorax tune`` the file in place."""
    from lorax.config import load_params
    from lorax.data.prepare import prepare_tasks
    from pipelines.cli.tune import run_tune
    from pipelines.tune import tuned_tasks

    params = load_params(params_file, overrides)
    work = params_file.with_name(params_file.stem + ".tune")
    manifests = work / "manifests"
    tasks = tuned_tasks(params)
    print(f"tuning {', '.join(f'{k}: {v}' for k, v in params.tune.grid.items())} on the train split of {tasks} "
          f"({params.tune.folds} grouped folds; val is never read)")
    for r in prepare_tasks(root=params.data.root, tasks=tasks, out_dir=manifests, cfg=params.data,
                           crop=params.model.img_size):
        print(r.summary())
    return run_tune(params_file, params_file, overrides, manifests=manifests, work=work, track=track)


def _stream_add(args: argparse.Namespace) -> int:
    from pipelines.stream_edit import append_to_stream

    if bool(args.name) == bool(args.next):
        raise ValueError("give a task name or --next (not both)")
    root = Path(args.params).parent
    name = append_to_stream(args.params, None if args.next else args.name, root=root)
    print(f"added {name} to the stream in {args.params}")
    print(dvc_preview(root, name))
    return 0


# What a clone needs besides the DVC remote: the pipeline's record, and the outputs DVC leaves to git (cache: false).
SHARE_FILES = ("dvc.lock", "params.yaml", "reports/registry", "reports/metrics.json", "reports/metrics_details.json",
               "reports/plots")


def _untracked_by_git(root: Path, path: str) -> bool:
    """``path`` exists in the git work tree ``root`` but git does not track it (False outside a git work tree)."""
    git = shutil.which("git")
    if git is None or not (root / path).exists() or not (root / ".git").exists():
        return False
    res = subprocess.run([git, "ls-files", "--error-unmatch", path], cwd=root, capture_output=True, text=True)
    return res.returncode != 0


def share_hint(root: Path) -> str:
    """How to share a pipeline run the DVC way (printed by ``lorax demo``; the README says the same)."""
    return ("To share this run, DVC's convention: commit the pipeline's record and the small outputs DVC leaves to git,\n"
            f"  git add {' '.join(SHARE_FILES)} && git commit -m 'pipeline run'\n"
            "and push the cached outputs to a DVC remote (once: dvc remote add -d store <folder or s3://...>):\n"
            "  dvc push\n"
            "A clone then runs `dvc pull` and `dvc repro`, which only rebuilds the built-in zoo (synth@<task>, seconds;\n"
            "a folder dataset must be at data.root) and trains nothing. The registry is the MLflow store:\n"
            "share it too (tracking.uri of a server, or copy mlflow.db and mlartifacts/).")


def dvc_preview(root: str | Path, task: str | None = None) -> str:
    """What ``dvc status`` says will run, in a few lines (``dvc repro --dry`` cannot tell: DVC 3 stops its dry run
    at the first stage whose inputs an earlier stage makes)."""
    root = Path(root)
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return "no DVC project here (dvc.yaml, .dvc/): run the stream with `lorax train` or set up DVC (`lorax demo`)"
    # the main pipeline only, as plain `dvc repro` (plain `dvc status` also lists pipelines/detection's stage)
    res = subprocess.run([_tool("dvc"), "status", "--json", "dvc.yaml"], cwd=root, env=tool_env(), capture_output=True,
                         text=True)
    try:
        stages = list(json.loads(res.stdout or "null") or {})
    except json.JSONDecodeError:
        stages = None
    if res.returncode != 0 or stages is None:
        why = (res.stderr or res.stdout).strip().splitlines()
        return f"`dvc status` failed ({why[-1] if why else f'exit {res.returncode}'}); run it to see what will re-run"
    lines = [f"`dvc status` shows {len(stages)} stage(s) to run: {', '.join(stages) or 'none'}"]
    if task is not None:
        others = [s for s in stages if s not in ("check", "report") and not s.endswith(f"@{task}")]
        if not (root / "dvc.lock").is_file():
            lines.append("no dvc.lock yet: `dvc repro` runs every stage of the stream")
        elif others:
            lines.append(f"besides {task}'s stages, {len(others)} other stage(s) are out of date ({', '.join(others[:6])}"
                         f"{' ...' if len(others) > 6 else ''}): a setting, a dataset or an output changed since "
                         "dvc.lock was written")
    if _untracked_by_git(root, "dvc.lock"):
        lines.append("dvc.lock is not committed: a clone of this project would run every stage again; commit it "
                     f"with the outputs DVC leaves to git: git add {' '.join(SHARE_FILES)}")
    lines.append("run them with `dvc repro`")
    return "\n".join(lines)


def parse_every(text: str) -> int:
    """``90``, ``30s``, ``15m``, ``1h``, ``1d`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ValueError(f"--every {text!r}: expected a duration such as 90, 30s, 15m, 1h or 1d")
    secs = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if secs < 1:
        raise ValueError(f"--every {text!r}: must be at least 1 second")
    return int(secs)


def _schedule(args: argparse.Namespace) -> int:
    secs = parse_every(args.every)
    env = tool_env()
    if not env.get("PREFECT_API_URL"):
        print("note: PREFECT_API_URL is not set, so Prefect runs a temporary server inside this process and its UI "
              "is not reachable. For the UI: `prefect server start` in another shell, then "
              "`export PREFECT_API_URL=http://127.0.0.1:4200/api`.", file=sys.stderr)
    cmd = [sys.executable, "-m", "pipelines.flows", "--params", args.params, "--root", args.root, "serve",
           "--every", str(secs)]
    print(f"serving the watch flow every {secs}s: {' '.join(cmd)} (Ctrl-C stops)")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130


def _demo(args: argparse.Namespace) -> int:
    root = Path(".").resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root}/dvc.yaml not found; run `lorax demo` from the project root")
    env = tool_env()
    dvc = _tool("dvc")
    ensure_dvc(root)
    cmd = [dvc, "repro"] + (["--force"] if args.force else [])
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    from pipelines.lifetime import ends_with_parent

    rc = subprocess.call(cmd, env=env, preexec_fn=ends_with_parent if sys.platform == "linux" else None)
    minutes = (time.time() - t0) / 60
    if rc != 0:
        print(f"\nlorax demo: `dvc repro` failed (exit {rc}) after {minutes:.1f} min; the messages above name the "
              "stage and the fix. Finished stages are kept: running `lorax demo` again continues.", file=sys.stderr)
        return rc
    print(f"\n`dvc repro` finished in {minutes:.1f} min\n")
    metrics_path = root / "reports" / "metrics.json"
    if metrics_path.is_file():
        from lorax.continual.summary import read_metrics
        from pipelines.summary_table import format_stream

        print(format_stream(read_metrics(metrics_path)))
        print()
    subprocess.call([sys.executable, "-m", "pipelines.cli", "models", "list"], env=env)
    from lorax.config import load_params
    from pipelines.tracking.uri import resolve_tracking_uri

    uri = resolve_tracking_uri(load_params("params.yaml").tracking, root)
    if uri == f"sqlite:///{root / 'mlflow.db'}":
        uri = "sqlite:///mlflow.db"
    print(f"""
Where to look:
  metrics      reports/metrics.json       (dvc metrics show reports/metrics.json; the accuracy matrix and per-task
                                           figures: reports/metrics_details.json)
  plots        reports/plots/*.png        (dvc plots show  ->  dvc_plots/index.html; until the detection
                                           pipeline has run, DVC notes that its reports/detect/ files are missing)
  MLflow UI    {_tool('mlflow')} ui --backend-store-uri {uri}   then open http://127.0.0.1:5000
  registry     lorax models list          (champion: models:/lorax-attributor@champion)
Next: add a generator and re-run only its stages:  lorax stream add --next && dvc repro
""")
    print(share_hint(root))
    return 0
