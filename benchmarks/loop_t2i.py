"""The loop on real images, end to end: ``python -m benchmarks.loop_t2i --out outputs/loop_t2i``.

What a user does with ``../shared/data/t2i`` and the real-image profile, in fresh project folders made from this
checkout (code copied, ``git init``, ``dvc init``; each project its own MLflow store and caches; the detector's pipeline
left out):

1. **DVC path** (``OUT/dvc``): ``lorax init --root data/t2i --tasks sd15,sd21,sdxl --profile realworld``,
   ``dvc repro``; then for each later generator its folder is copied in, ``lorax stream add NAME``, ``dvc repro``
   (each timed alone). Before the last one a ``lorax serve`` runs with a client sending a request every 0.5 s; the
   swap is timed when the alias moves by the gate, and once more by ``lorax models rollback`` / ``promote``.
2. **Prefect path** (``OUT/prefect``, unless ``--skip-prefect``): ``lorax init --tasks sd15``, the continual flow,
   then each later folder copied in and ``python -m pipelines.flows watch`` run, one folder at a time.
3. The two registries compared version by version (tasks, gate, accuracies to 0.1).

Report: ``OUT/loop_t2i.md`` and ``OUT/loop_t2i.json`` (each version's gate decision and figures, wall times, the
swap, the comparison). Not a CI test: about an hour on 2 CPU cores. ``--tasks`` / ``--first`` shorten it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TASKS = ["sd15", "sd21", "sdxl", "pixart512", "playground"]
EXTRA = ("params.realworld.yaml", "prefect.toml")  # beside what project_copy brings


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e.update(DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
             HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run ``cmd`` in ``cwd`` (output appended to ``log``); its wall seconds. A failure stops the benchmark."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        res = subprocess.run(cmd, cwd=cwd, env=env(), stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} ({res.returncode}); see {log}")
    return time.perf_counter() - t0


def make_project(root: Path, data: Path, tasks: list[str]) -> Path:
    """A fresh project (:func:`benchmarks.stage_overhead.project_copy`: this checkout's code and pipeline, git + DVC
    initialised) with the real-image profile, the Prefect settings and ``tasks``' folders in data/t2i."""
    from benchmarks.stage_overhead import project_copy

    project_copy(root)
    for name in EXTRA:
        shutil.copy(REPO / name, root / name)
    for t in tasks:
        add_folder(root, data, t)
    return root


def add_folder(root: Path, data: Path, task: str) -> None:
    shutil.copytree(data / task, root / "data" / "t2i" / task)


def lorax(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def versions(root: Path) -> list[dict[str, Any]]:
    out = subprocess.run(lorax("models", "list", "--json"), cwd=root, env=env(), capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


class Client:
    """Sends one scoring request every ``every`` s to a ``lorax serve``; records (time, HTTP code, version)."""

    def __init__(self, url: str, image: bytes, every: float = 0.5) -> None:
        self.url, self.every, self.log = url, every, []
        self.body = json.dumps({"dataframe_records": [{"image": base64.b64encode(image).decode()}]}).encode()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _loop(self) -> None:
        deadline = time.time() + 4 * 3600  # bounded
        while not self._stop.is_set() and time.time() < deadline:
            req = urllib.request.Request(self.url, self.body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    rows = json.loads(r.read())["predictions"]
                    v = rows[0].get("model_version")
                    self.log.append((time.time(), r.status, int(v) if v is not None else None))
            except urllib.error.HTTPError as e:
                self.log.append((time.time(), e.code, None))
            except OSError:
                self.log.append((time.time(), 0, None))
            self._stop.wait(self.every)

    def first_answer_of(self, version: int, after: float) -> float | None:
        return next((t for t, c, v in self.log if v == version and t >= after), None)


def wait_for(client: Client, version: int, since: float, limit: float = 120.0) -> float | None:
    """Seconds from ``since`` until the server first answered with ``version`` (None: not within ``limit``)."""
    while time.time() < since + limit:
        t = client.first_answer_of(version, since)
        if t is not None:
            return t - since
        time.sleep(0.2)
    return None


def dvc_path(out: Path, data: Path, tasks: list[str], first: int, port: int) -> dict[str, Any]:
    root = make_project(out / "dvc", data, tasks[:first])
    log = root / "commands.log"
    res: dict[str, Any] = {"steps": []}
    run(lorax("init", "--root", "data/t2i", "--tasks", ",".join(tasks[:first]), "--profile", "realworld"), root, log)
    res["steps"].append({"tasks": tasks[:first], "command": "dvc repro", "seconds": run(["dvc", "repro"], root, log)})
    server = client = None
    try:
        for k, t in enumerate(tasks[first:]):
            last = k == len(tasks) - first - 1
            add_folder(root, data, t)
            if last:  # a running server while the last generator is learned
                server = subprocess.Popen(lorax("serve", "--port", str(port), "--poll", "2"), cwd=root, env=env(),
                                          stdout=open(root / "serve.log", "w"), stderr=subprocess.STDOUT)
                url = f"http://127.0.0.1:{port}"
                for _ in range(120):
                    try:
                        urllib.request.urlopen(f"{url}/ping", timeout=5)
                        break
                    except OSError:
                        time.sleep(1)
                image = sorted((data / tasks[0] / "val" / "1_fake").glob("*"))[0].read_bytes()
                client = Client(f"{url}/invocations", image)
                client.start()
            run(lorax("stream", "add", t), root, log)
            res["steps"].append({"tasks": [t], "command": f"lorax stream add {t} && dvc repro",
                                 "seconds": run(["dvc", "repro"], root, log)})
        res["dvc_status"] = subprocess.run(["dvc", "status", "dvc.yaml"], cwd=root, env=env(), capture_output=True,
                                           text=True).stdout.strip()
        vs = versions(root)
        res["versions"] = vs
        if client is not None:
            res["serve"] = swap_figures(root, client, vs, log)
    finally:
        if client is not None:
            client.stop()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    if client is not None:
        codes = [c for _, c, _ in client.log]
        res.setdefault("serve", {}).update(requests=len(codes), failed=sum(c != 200 for c in codes))
    return res


def swap_figures(root: Path, client: Client, vs: list[dict[str, Any]], log: Path) -> dict[str, Any]:
    """Swap latencies: when the gate moved the alias during the last task (if it did), and by hand."""
    out: dict[str, Any] = {}
    last = vs[-1]
    if "champion" in last["aliases"]:
        out["gate_swap_s"] = wait_for(client, last["version"], last["created"] / 1000.0)
    target = next((v for v in reversed(vs) if "champion" not in v["aliases"] and v["gate"] == "passed"), None)
    if target is not None:
        champ = next(v for v in vs if "champion" in v["aliases"])
        t0 = time.time()
        run(lorax("models", "promote", str(target["version"]), "--reason", "benchmark: swap latency"), root, log)
        out["promote_swap_s"] = wait_for(client, target["version"], t0)
        t0 = time.time()
        run(lorax("models", "promote", str(champ["version"]), "--reason", "benchmark: back to the gate's champion"),
            root, log)
        out["promote_back_swap_s"] = wait_for(client, champ["version"], t0)
    return out


def prefect_path(out: Path, data: Path, tasks: list[str]) -> dict[str, Any]:
    root = make_project(out / "prefect", data, tasks[:1])
    log = root / "commands.log"
    res: dict[str, Any] = {"steps": []}
    run(lorax("init", "--root", "data/t2i", "--tasks", tasks[0], "--profile", "realworld"), root, log)
    flows = [sys.executable, "-m", "pipelines.flows"]
    res["steps"].append({"tasks": tasks[:1], "command": "flows continual", "seconds": run([*flows, "continual"],
                                                                                         root, log)})
    for t in tasks[1:]:
        add_folder(root, data, t)
        res["steps"].append({"tasks": [t], "command": "flows watch", "seconds": run([*flows, "watch"], root, log)})
    res["dvc_status"] = subprocess.run(["dvc", "status", "dvc.yaml"], cwd=root, env=env(), capture_output=True,
                                       text=True).stdout.strip()
    res["versions"] = versions(root)
    return res


def compare_chains(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    """Differences between two registries' versions (tasks, gate, per-task accuracy to 0.1); [] when the same."""
    diffs = []
    if [v["tasks"] for v in a] != [v["tasks"] for v in b]:
        diffs.append(f"tasks differ: {[v['tasks'] for v in a]} vs {[v['tasks'] for v in b]}")
    for va, vb in zip(a, b, strict=False):
        if va["gate"] != vb["gate"]:
            diffs.append(f"v{va['version']}: gate {va['gate']} vs {vb['gate']}")
        for t, acc in va["task_acc"].items():
            if abs(acc - vb["task_acc"].get(t, float("nan"))) > 0.1 or t not in vb["task_acc"]:
                diffs.append(f"v{va['version']} {t}: {acc:.2f} vs {vb['task_acc'].get(t)}")
    return diffs


def report(res: dict[str, Any]) -> str:
    lines = ["# The loop on t2i (real-image profile)", ""]
    for path in ("dvc", "prefect"):
        if path not in res:
            continue
        lines += [f"## {path}", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {s['command']} ({','.join(s['tasks'])}) | {s['seconds']:.0f} |" for s in res[path]["steps"]]
        lines += ["", "| version | parent | tasks | gate | union cand/champ | aliases | reason |", "|---|---|---|---|---|---|---|"]
        for v in res[path]["versions"]:
            f = v.get("gate_figures") or {}
            union = f"{f['pooled']['candidate']:.1f} / {f['pooled']['champion']:.1f}" if f.get("pooled") else "-"
            lines.append(f"| {v['version']} | {v.get('parent') or '-'} | {','.join(v['tasks'])} | {v['gate']} | "
                         f"{union} | {','.join(v['aliases']) or '-'} | {v['gate_reason']} |")
        lines += ["", f"`dvc status` after: {res[path].get('dvc_status') or '(nothing)'}", ""]
    if "serve" in res.get("dvc", {}):
        lines += ["## lorax serve during the last task", "", "```", json.dumps(res["dvc"]["serve"], indent=1), "```",
                  ""]
    if "same_chain" in res:
        lines += ["## DVC vs Prefect", "", "same chain: " + ("yes" if not res["same_chain"] else
                                                          "no: " + "; ".join(res["same_chain"])), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "t2i")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--first", type=int, default=3, help="tasks of the first `dvc repro`")
    p.add_argument("--port", type=int, default=5071)
    p.add_argument("--skip-dvc", action="store_true")
    p.add_argument("--skip-prefect", action="store_true")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: the t2i set is not there (../shared/data/t2i); give --data")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "loop_t2i.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    res["machine"] = {"cpus": os.cpu_count(), "platform": sys.platform}
    if not args.skip_dvc:
        res["dvc"] = dvc_path(args.out.resolve(), args.data.resolve(), tasks, args.first, args.port)
        path.write_text(json.dumps(res, indent=1))
    if not args.skip_prefect:
        res["prefect"] = prefect_path(args.out.resolve(), args.data.resolve(), tasks)
    if "dvc" in res and "prefect" in res:
        res["same_chain"] = compare_chains(res["dvc"]["versions"], res["prefect"]["versions"])
    path.write_text(json.dumps(res, indent=1))
    (args.out / "loop_t2i.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
