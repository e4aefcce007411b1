"""All continual methods on the same stream, one table: ``python -m benchmarks.methods_table``.

Runs ``lorax train`` for each method (same manifests, same settings, same process order), then prints a
markdown table of AA, AAF, BWT, binary accuracy, trainable parameters per task and seconds per task, and writes
it with the raw metrics to ``OUT/methods.md`` and ``OUT/methods.json``. Finished methods are reused on a re-run.

    python -m benchmarks.methods_table --manifests data/manifests --out outputs/methods [-S key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from lorax.config import load_params
from pipelines.cli.settings import add_settings_arguments, parse_overrides
from pipelines.train_stream import run_stream
from lorax.registry import METHODS
import lorax.continual.trace_methods  # noqa: F401  (registers the methods, trace and lorax+trace too)


def table(rows: dict[str, dict]) -> str:
    head = "| method | AA | AAF | BWT | binary acc | trainable params / task | backbone params | s / task |\n"
    head += "|---|---|---|---|---|---|---|---|\n"
    for name, m in rows.items():
        per_task = m["trainable_params_per_task"]
        head += (
            f"| {name} | {m['aa']:.2f} | {m['aaf']:.2f} | {m['bwt']:.2f} | {m['binary_acc']:.2f} | "
            f"{per_task[-1]:,} (last) | {m['backbone_params']:,} | "
            f"{sum(m['seconds_per_task']) / len(m['seconds_per_task']):.1f} |\n"
        )
    return head


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(ap)
    ap.add_argument("--manifests", default=None)
    ap.add_argument("--out", default="outputs/methods")
    ap.add_argument("--methods", nargs="+", default=["lorax", "finetune", "der", "joint", "probe"])
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = {}
    for name in args.methods:
        METHODS.get(name)
        ov = parse_overrides(args.set)
        ov["continual.method"] = name
        params = load_params(args.params, ov)
        t0 = time.time()
        rows[name] = run_stream(params, args.manifests or params.data.manifests, out / name)
        print(f"{name}: AAF {rows[name]['aaf']:.2f} BWT {rows[name]['bwt']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    md = table(rows)
    cmd = "python -m benchmarks.methods_table " + " ".join(f"-S {s}" for s in args.set)
    note = f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.processor() or platform.machine()}; `{cmd}`\n"
    (out / "methods.md").write_text(md + note)
    (out / "methods.json").write_text(json.dumps(rows, indent=2))
    print(md + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
