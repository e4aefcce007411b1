"""Training cost per task against the task index: published LoRAX vs shared trunk + one pass + the feature store.

    python -m benchmarks.task_cost [--tasks 12] [--epochs 10] [--modes fast published] [--json]

Builds a stream of ``--tasks`` tiny synthetic tasks (noise PNGs in the CDDB layout; the content does not matter
for timing), then trains it with :func:`lorax.continual.trainer.train_task` and selects exemplars after each task
(memory rows join the next task's training set, as in a real stream), in each mode:

* ``published``  adapters in all blocks, the sequential loop (one full backbone pass per adapter), no cache:
                 LoRAX as published; a step of task t costs ~t forward passes + one backward;
* ``fast``       adapters in the last ``--last-k`` blocks (shared trunk), one grouped pass, ``train.views`` K fixed
                 views per image whose trunk tokens and old adapters' embeddings come from the feature store
                 (computed once), and the decode cache.

Modes are interleaved task by task so that a change of machine load hits both alike. Reported per task: training
seconds (``train_task``, including loading the previous state and building the cache) and its ratio to task 2,
and the mean seconds of an epoch after the first (the steady-state training loop).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from benchmarks import emit_json
from lorax.config import Params, load_params, set_by_path

REPO = Path(__file__).resolve().parents[1]


def make_stream(root: Path, tasks: list[str], per_class: int, size: int, seed: int = 0) -> None:
    """CDDB-layout noise images: ``per_class`` train and 2 val images per class and task."""
    rng = np.random.default_rng(seed)
    for t in tasks:
        for split, n in (("train", per_class), ("val", 2)):
            for cls in ("0_real", "1_fake"):
                d = root / t / split / cls
                d.mkdir(parents=True, exist_ok=True)
                for k in range(n):
                    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{k}.png")


def mode_params(mode: str, args: argparse.Namespace, work: Path, tasks: list[str]) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    ov = {
        "data.source": "folder", "data.root": str(work / "data"), "data.manifests": str(work / "manifests"),
        "stream": {t: {"prev": "init" if i == 0 else tasks[i - 1]} for i, t in enumerate(tasks)},
        "model.backbone": args.backbone, "model.img_size": args.img_size, "model.pretrained": args.pretrained,
        "model.kwargs": {"patch_size": args.patch_size},
        "adapter.r": args.rank, "adapter.alpha": 0.25 * args.rank,
        "continual.memory_size": args.memory, "train.epochs": args.epochs, "train.batch_size": args.batch,
        "train.warmup_epochs": 1, "train.device": "cpu" if args.device == "cpu" else "auto",
        "cache.dir": str(work / "cache"),
    }
    if mode == "published":
        ov.update({"adapter.blocks": "all", "train.one_pass": False, "train.views": 0, "cache.decode": False})
    else:
        ov.update({"adapter.blocks": "last_k", "adapter.last_k": args.last_k, "train.one_pass": True,
                   "train.views": args.views, "cache.decode": True})
    for k, v in ov.items():
        set_by_path(raw, k, v)
    path = work / f"params-{mode}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.task_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["fast", "published"], choices=["fast", "published"])
    ap.add_argument("--published-tasks", type=int, help="train only the first N tasks in published mode (it is slow)")
    ap.add_argument("--per-class", type=int, default=12,
                    help="train images per class and task (>= memory / 2: the memory is full from task 2 on)")
    ap.add_argument("--memory", type=int, default=24, help="exemplar memory (continual.memory_size)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backbone", default="convit_tiny")
    ap.add_argument("--pretrained", default=None, help="model.pretrained (default: none; timing needs no weights)")
    ap.add_argument("--img-size", type=int, default=16, help="crop fed to the backbone")
    ap.add_argument("--image-px", type=int, default=20, help="side of the stored images (random crops within)")
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--last-k", type=int, default=3)
    ap.add_argument("--views", type=int, default=2, help="train.views of the fast mode")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, i.e. the cores); 1 "
                    "measures compute rather than thread wake-ups on a machine loaded by other work")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--out", help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory < 2 * args.tasks:
        ap.error(f"--memory must be >= 2 x tasks ({2 * args.tasks})")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")

    from lorax.continual.memory import ExemplarMemory
    from lorax.continual.state import load_state
    from lorax.continual.trainer import train_task
    from lorax.continual.selection import select_exemplars
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lorax-task-cost-"))
    tasks = [f"g{i:02d}" for i in range(args.tasks)]
    load0 = os.getloadavg()
    try:
        make_stream(work / "data", tasks, args.per_class, args.image_px)
        params = {m: mode_params(m, args, work, tasks) for m in args.modes}
        p0 = params[args.modes[0]]
        prepare_tasks(p0.data.root, tasks, p0.data.manifests, p0.data, p0.model.img_size)
        manifests = load_stream_manifests(p0.data.manifests, tasks)
        prev: dict[str, tuple[Path | None, ExemplarMemory | None]] = {m: (None, None) for m in args.modes}
        rows: list[dict] = []
        if not args.json:
            print(f"{args.backbone} img {args.img_size} patch {args.patch_size} r {args.rank} epochs {args.epochs} "
                  f"batch {args.batch} {2 * args.per_class} images/task + memory {args.memory}; threads "
                  f"{torch.get_num_threads()}; load {load0[0]:.2f}")
            head = "  ".join(f"{m + ' s':>12} {'x task 2':>8} {'epoch s':>8}" for m in args.modes)
            print(f"task  {head}   rows  load")
        for i, t in enumerate(tasks):
            row: dict = {"task_index": i + 1}
            for m in args.modes:
                if m == "published" and args.published_tasks is not None and i >= args.published_tasks:
                    row[f"{m}_train_s"] = row[f"{m}_select_s"] = row[f"{m}_epoch_s"] = row[f"{m}_rows"] = None
                    continue
                prev_state, memory = prev[m]
                out = work / m / "state" / t
                stamps: list[float] = []
                row[f"{m}_rows"] = 2 * args.per_class + (len(memory) if memory is not None else 0)  # images / epoch
                t0 = time.perf_counter()
                train_task(prev_state, manifests[t], memory, params[m], out,
                           callback=lambda epoch, _row: stamps.append(time.perf_counter()))
                row[f"{m}_train_s"] = round(time.perf_counter() - t0, 2)
                # steady state: mean epoch after the first (no state loading, cache building, first-call costs)
                epoch_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
                row[f"{m}_epoch_s"] = None if epoch_s is None else round(epoch_s, 3)
                t1 = time.perf_counter()
                method, _ = load_state(out, params=params[m])
                memory = select_exemplars(method, manifests[t], memory, params[m])
                row[f"{m}_select_s"] = round(time.perf_counter() - t1, 2)
                prev[m] = (out, memory)
            row["load_1min"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            if not args.json:
                cells = []
                for m in args.modes:
                    if row[f"{m}_train_s"] is None:
                        cells.append(f"{'-':>12} {'-':>8} {'-':>8}")
                        continue
                    base = rows[1][f"{m}_train_s"] if len(rows) > 1 else None
                    ratio = f"{row[f'{m}_train_s'] / base:.2f}" if base else "-"
                    ep = "-" if row[f"{m}_epoch_s"] is None else f"{row[f'{m}_epoch_s']:.2f}"
                    cells.append(f"{row[f'{m}_train_s']:>12.2f} {ratio:>8} {ep:>8}")
                rows_now = row[f"{args.modes[0]}_rows"]
                print(f"{i + 1:>4}  " + "  ".join(cells) + f"   {rows_now:>4}  {row['load_1min']:.2f}", flush=True)
        summary = {}
        for m in args.modes:
            done = [r for r in rows if r[f"{m}_train_s"] is not None]
            if len(done) >= 2:
                last = done[-1]
                ratio = last[f"{m}_train_s"] / done[1][f"{m}_train_s"]
                summary[f"{m}_task{last['task_index']}_over_task2"] = round(ratio, 3)
        result = {
            "config": {**{k: v for k, v in vars(args).items() if k not in ("json", "keep")},
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                       "cpu_count": os.cpu_count(), "load_average_start": [round(v, 2) for v in load0],
                       "load_average_end": [round(v, 2) for v in os.getloadavg()]},
            "tasks": rows,
            "summary": summary,
        }
        emit_json(result, args.out, args.json)
        if not args.json:
            print(" ".join(f"{k} {v:.2f}x" for k, v in summary.items()) + f"; load average {os.getloadavg()}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
