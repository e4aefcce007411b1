"""How much would the last head gain from seeing more of every old class? ``python -m benchmarks.head_memory``.

A finished stream's last state keeps its frozen super-feature (every adapter / expert / backbone part is frozen);
only its class head, refit after the task on the task's train rows + the exemplar memory (``continual.head:
refit``), depends on how many rows of each old class it saw. This refits that head, with the same solver and C
(:func:`lorax.continual.head.refit_head`), on:

* ``own``: the state's own fit rows (the task's train rows + the memory it was trained with): must reproduce the
  state's accuracy (a check that the features and the solver are the state's);
* ``own, class-balanced``: the same rows, each class weighted by ``rows / (classes x its rows)`` (is the newest
  task's larger class count what biases the head?);
* ``k per old class``: the task's train rows + ``k`` train rows of every old class drawn at random (seeded), for each
  ``--per-class`` k: what a memory of about ``k x old classes`` rows would give the head, the features held fixed.

Pooled multi-real accuracy on the val rows of every task, and per task. Features come from the stream's feature
store (``-S cache.dir=`` the stream's cache), so only rows it never stored go through the model. Val is read for
the report only: this is a diagnosis of a finished run, not a way to choose a setting (``lorax tune`` chooses on the
train split).

    python -m benchmarks.head_memory --run OUT/lorax+trace --manifests M --data ../shared/data/t2i \\
        -S cache.dir=C --out outputs/head_memory
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.cli.settings import add_settings_arguments, parse_overrides


def head_memory(run: Path, manifests: dict, cache: Any, per_class: list[int], seed: int = 0) -> dict[str, Any]:
    """The refits of the last state's head (module docstring); ``manifests``: every task's, in stream order."""
    import pandas as pd

    from lorax.continual import metrics as M
    from lorax.continual.evaluation import predict_logits, val_rows
    from lorax.continual.head import refit_head

    tasks = list(manifests)
    method, p, store, new, memory = last_state(run, manifests, cache)
    c = p.continual
    val = val_rows([manifests[t] for t in tasks])
    state_logits, fv = predict_logits(method, val, p, features=True, desc="head_memory val", store=store)
    target, task_ids, k = val["class_id"].to_numpy(), val["task_index"].to_numpy(), 2 * len(tasks)

    def score(logits: np.ndarray) -> dict[str, Any]:
        ok = M.multi_real_correct(logits.argmax(1), target)
        return {"pooled": round(float(100 * ok.mean()), 2),
                "per_task": [round(float(100 * ok[task_ids == i].mean()), 1) for i in range(len(tasks))]}

    def fit(rows: pd.DataFrame, balanced: bool = False) -> dict[str, Any]:
        _, f = predict_logits(method, rows, p, features=True, desc="head_memory fit", store=store)
        x, y = torch.from_numpy(np.array(f, np.float32)), torch.tensor(rows["class_id"].to_numpy(np.int64))
        w, b = refit_head(x, y, k, "refit", c.head_c, c.head_max_iter, balanced)
        return {**score(fv @ w.numpy().T + b.numpy()), "rows": len(rows)}

    own = pd.concat([new, memory], ignore_index=True)
    out: dict[str, Any] = {"state": score(state_logits), "own": fit(own), "own_balanced": fit(own, balanced=True)}
    rng = np.random.default_rng(seed)
    for n in per_class:
        parts = [new]
        for t in tasks[:-1]:
            tr = manifests[t][manifests[t]["split"] == "train"]
            for _, g in tr.groupby("class_id"):
                parts.append(g.iloc[np.sort(rng.choice(len(g), min(n, len(g)), replace=False))])
        out[f"{n}_per_old_class"] = fit(pd.concat(parts, ignore_index=True))
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = ["| head fitted on | rows | pooled | per task |", "|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r.get('rows', '-')} | {r['pooled']:.1f} | {', '.join(map(str, r['per_task']))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = stream_parser(__doc__)
    ap.add_argument("--per-class", nargs="*", type=int, default=[20, 41, 80, 140, 200])
    ap.add_argument("--out", default="outputs/head_memory")
    args = ap.parse_args(argv)
    from lorax.config import load_params

    p = load_params(args.params, parse_overrides(args.set))
    run = Path(args.run)
    manifests = finished_stream(run, args.manifests, args.data or p.data.root)
    res = head_memory(run, manifests, p.cache, args.per_class, seed=p.seed)
    report(Path(args.out), "head_memory", res, markdown(res))
    return 0


def last_state(run: Path, manifests: dict, cache: Any) -> tuple[Any, Any, Any, Any, Any]:
    """A finished stream's last state, its params with the stream's ``cache``, that feature store, and the rows its
    head was fitted on: the last task's train rows and the memory before it (as the trainer read them)."""
    from lorax.continual.memory import ExemplarMemory
    from lorax.continual.state import load_state
    from lorax.features import open_store

    tasks = list(manifests)
    method, _ = load_state(run / "state" / tasks[-1])
    p = method.params.model_copy(deep=True)
    p.cache = cache
    last = manifests[tasks[-1]]
    new = last[last["split"] == "train"]
    root = new["root"].iloc[0] if "root" in new.columns and len(new) else None
    memory = ExemplarMemory.load(run / "memory" / f"{tasks[-2]}.parquet", root).manifest() if len(tasks) > 1 \
        else new.iloc[:0]
    return method, p, open_store(cache), new, memory


def stream_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark on a finished stream: settings, ``--run``, ``--manifests``, ``--data``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(ap, default="params.realworld.yaml")
    ap.add_argument("--run", required=True, help="a finished stream's run folder (holding state/ and memory/)")
    ap.add_argument("--manifests", required=True, help="the stream's manifests")
    ap.add_argument("--data", help="dataset root the manifests' rows live under (default: data.root)")
    return ap


def finished_stream(run: Path, manifests: str | Path, data_root: str) -> dict:
    """The manifests of ``run``'s last state's tasks (the state that holds the most), in stream order."""
    from lorax.continual.state import read_info
    from lorax.data.manifest import load_stream_manifests

    last = max((d for d in (run / "state").iterdir() if (d / "state.json").is_file()),
               key=lambda d: len(read_info(d)["tasks"]))
    return load_stream_manifests(manifests, read_info(last)["tasks"], data_root)


def report(out: Path, name: str, res: dict[str, Any], md: str) -> None:
    """``out/<name>.json`` and ``.md``; the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    (out / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
