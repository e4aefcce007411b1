"""How much of ``dvc repro`` is not the steps' own work: cold stage processes vs warm ones, side by side.

    python -m benchmarks.stage_overhead [--modes cold warm] [--out outputs/stage_overhead]

Each mode runs the project's whole pipeline (``dvc repro`` of params.yaml's stream, the built-in zoo) from scratch
in its own copy of the working tree, one mode after the other in one run. Every stage records, through
``LORAX_STAGE_TIMES`` (pipelines/_stage.py), its step time and the seconds the step spent in ``import`` statements;
the steps' own work is the step time less those imports, and the overhead is the wall time less the work: process
start-up, imports, DVC's bookkeeping. ``cold`` is ``LORAX_WARM=0`` (every stage imports torch, timm, peft, MLflow
itself); ``warm`` forks the stages from the warm stage server (pipelines/warm.py). Also checks that both modes
give the same accuracy matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY = ("lorax", "pipelines", "params.yaml", "dvc.yaml", ".dvcignore", ".gitignore")


def project_copy(dest: Path) -> Path:
    """The working tree's code and pipeline in a fresh git + DVC project (no data, state or caches)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "detection"))
        else:
            shutil.copy(src, dest / name)
    env = dict(os.environ)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=dest, check=True, env=env)
    return dest


def run_mode(mode: str, root: Path) -> dict:
    times = root / "stage_times.jsonl"
    env = dict(os.environ, LORAX_STAGE_TIMES=str(times), LORAX_WARM="1" if mode == "warm" else "0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    t0 = time.time()
    res = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=root, env=env,
                         capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"{mode}: dvc repro failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    rows = [json.loads(line) for line in times.read_text().splitlines()]
    work = sum(r["step_s"] - r.get("step_imports_s", 0.0) for r in rows)
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(r["stage"].split("@")[0], []).append(r["startup_s"] + r.get("step_imports_s", 0.0))
    from lorax.continual.summary import read_metrics

    metrics = read_metrics(root / "reports" / "metrics.json")
    return {"mode": mode, "wall_s": round(wall, 1), "work_s": round(work, 1), "overhead_s": round(wall - work, 1),
            "overhead_share": round((wall - work) / wall, 3), "stages": len(rows),
            "warm_stages": sum(bool(r.get("warm")) for r in rows),
            "startup_per_stage_s": {k: round(sum(v) / len(v), 2) for k, v in by_kind.items()},
            "acc_matrix": metrics["acc_matrix"], "aa": metrics["aa"], "aaf": metrics["aaf"], "bwt": metrics["bwt"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    ap.add_argument("--out", default="outputs/stage_overhead")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    results = []
    for mode in args.modes:
        r = run_mode(mode, project_copy(out / mode))
        results.append(r)
        print(f"{mode:>5}: wall {r['wall_s']:7.1f} s  work {r['work_s']:7.1f} s  overhead {r['overhead_s']:6.1f} s "
              f"({100 * r['overhead_share']:.1f}%)  warm stages {r['warm_stages']}/{r['stages']}", flush=True)
    if len(results) > 1:
        same = all(r["acc_matrix"] == results[0]["acc_matrix"] for r in results)
        print(f"same accuracy matrix in every mode: {same}  (AA {results[0]['aa']}, AAF {results[0]['aaf']}, "
              f"BWT {results[0]['bwt']})")
    print("start-up + imports per stage (s): " + json.dumps({r["mode"]: r["startup_per_stage_s"] for r in results}))
    (out / "stage_overhead.json").write_text(json.dumps(results, indent=2))
    try:
        load = os.getloadavg()
        print(f"load average after: {[round(x, 2) for x in load]}")
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
