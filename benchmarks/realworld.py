"""The real-image protocol, one table: ``python -m benchmarks.realworld``.

The six-task stream of ``../shared/data/realworld`` (biggan, stylegan2, ldif, glid3, dmin, disco) with
``params.realworld.yaml``, through the library (:func:`pipelines.train_stream.run_stream`), for each method
(``continual.method``: lorax, joint, finetune, probe) and, for LoRAX, each exemplar budget (``--memory``, default the
settings file's own ``continual.memory_size``; the other methods use the first). Every run is evaluated as is and
under the resampling control (``eval.resample_control``, Lanczos 256 -> 240 px before cropping; switched on here if
the settings file has it off), so a model that learned "resampled means real" shows. The val split is scored only:
nothing is chosen on it.

Table (``OUT/realworld.md`` and ``OUT/realworld.json``): pooled multi-real accuracy after the last task, AAF, AA,
BWT (percent), binary accuracy at the threshold cross-fitted on the val images of the seen tasks and binary AP, each
"as is / resampled", and wall seconds. A finished run is reused on a re-run (its wall time as first measured); a
run stopped and resumed counts every segment (an interrupted one up to its last saved file).

    python -m benchmarks.realworld --out outputs/realworld                 # the whole protocol (224 px: slow on CPU)
    python -m benchmarks.realworld --methods lorax probe --out outputs/realworld   # the rows 2 CPU cores finish
    python -m benchmarks.realworld --quick --out /tmp/rw_quick             # 2 tasks, tiny random model: plumbing only
    python -m benchmarks.realworld --methods lorax --memory 500 -S train.epochs=4

``joint`` and ``finetune`` train the whole backbone at 224 px (no frozen trunk to cache, every step back-propagates
through all 12 blocks): on 2 CPU cores that is hours per row (docs/results.md); run them where a GPU is.
``probe`` trains no epoch when the head is refit (``METHOD_OVERRIDES``): its head is the closed-form refit on the
frozen features, which the embedding store keeps once per image.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

PROTOCOL_TASKS = ["biggan", "stylegan2", "ldif", "glid3", "dmin", "disco"]
# --protocol: the task order and the data folder of each real-image protocol (ROOT relative to the checkout)
PROTOCOLS: dict[str, dict[str, Any]] = {
    "realworld": {"tasks": PROTOCOL_TASKS, "root": "../shared/data/realworld", "scenario": "realworld-6"},
    "t2i": {"tasks": ["sd15", "sd21", "sdxl", "pixart512", "playground", "kandinsky3", "ddb"],
            "root": "../shared/data/t2i", "scenario": "t2i-7"},
}
METHODS = ["lorax", "joint", "finetune", "probe"]  # the default rows
CHOICES = [*METHODS, "der", "trace", "lorax+trace"]  # every registered method may be asked for by name
CONTROL = {"scale": 0.9375, "filter": "lanczos"}  # 256 -> 240 px
# --quick: the first two tasks and a tiny random ConViT on 32 px crops; checks the plumbing, not the figures
QUICK: dict[str, Any] = {
    "model.backbone": "convit_tiny",
    "model.pretrained": None,
    "model.img_size": 32,
    "model.spectrum": {"grid": 8, "sigma": 1.0},
    "model.feature_levels": [1],
    "model.kwargs": {"depth": 2, "local_up_to_layer": 1, "patch_size": 8, "num_heads": 2, "embed_dim": 32},
    "adapter.r": 4,
    "adapter.alpha": 1.0,
    "adapter.last_k": 1,
    "train.epochs": 1,
    "train.batch_size": 16,
    "train.warmup_epochs": 0,
    "eval.batch_size": 32,
}
# the probe's backbone is frozen and its head is refit in closed form (continual.head: refit): gradient epochs would
# train a head that the refit then replaces, so it trains none
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {"probe": {"train.epochs": 0}}
COLUMNS = [("pooled_acc", "pooled acc"), ("aaf", "AAF"), ("bwt", "BWT"), ("binary_ap", "binary AP"),
           ("balanced_acc", "balanced acc"), ("real_acc", "real called real"), ("set_coverage", "set coverage"),
           ("set_size", "set size")]
JPEG_CONTROL = [90, 60]


def stream_of(tasks: list[str]) -> dict[str, dict[str, str]]:
    return {t: {"prev": "init" if i == 0 else tasks[i - 1]} for i, t in enumerate(tasks)}


def runs(methods: list[str], memory: list[int]) -> list[tuple[str, str, int]]:
    """(run name, method, memory size): LoRAX once per budget, the others with the first budget."""
    out = []
    for m in methods:
        for size in memory if m == "lorax" else memory[:1]:
            out.append((f"{m}-m{size}" if m == "lorax" else m, m, size))
    return out


def _controls(rows: dict[str, dict[str, Any]]) -> list[str]:
    names = {c for m in rows.values() for c in (m.get("control") or {})}
    return [c for c in ("resampled", *(f"jpeg{q}" for q in (90, 75, 60, 50, 30))) if c in names]


def _cell(m: dict[str, Any], key: str, controls: list[str]) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{float(v):.1f}"

    return " / ".join([fmt(m.get(key)), *(fmt((m.get("control") or {}).get(c, {}).get(key)) for c in controls)])


def table(rows: dict[str, dict[str, Any]]) -> str:
    controls = _controls(rows)
    views = " / ".join(["as is", *controls])
    head = "| run | " + " | ".join(f"{label} ({views})" for _, label in COLUMNS) + " | wall s |\n"
    head += "|---|" + "---|" * (len(COLUMNS) + 1) + "\n"
    for name, m in rows.items():
        head += f"| {name} | " + " | ".join(_cell(m, k, controls) for k, _ in COLUMNS) + f" | {m['wall_s']:.0f} |\n"
    return head


def paired_bootstrap(a: Path, b: Path, root: Path, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Pooled multi-real accuracy of run ``a`` minus run ``b`` on the same images (their last evaluation's
    predictions), with a 95% interval from resampling groups with replacement (the dataset's own ``group``, t2i: the
    prompt, shared by the generators that drew it; :func:`lorax.data.groups.row_groups`)."""
    import numpy as np
    import pandas as pd

    from lorax.data.groups import row_groups

    ta, tb = pd.read_csv(a), pd.read_csv(b)
    if list(ta["path"]) != list(tb["path"]):
        raise ValueError(f"{a} and {b} score different images; rerun both on the same manifests")
    diff = ta["correct"].to_numpy(float) - tb["correct"].to_numpy(float)
    rel = [str(Path(p).resolve().relative_to(root.resolve())) for p in ta["path"]]
    codes, inv = np.unique(row_groups(pd.DataFrame({"root": str(root), "path": rel})).astype(str),
                           return_inverse=True)
    sums, counts = np.bincount(inv, diff, len(codes)), np.bincount(inv, minlength=len(codes)).astype(float)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(codes), (n, len(codes)))
    boots = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": float(100 * diff.mean()), "lo": float(100 * lo), "hi": float(100 * hi), "groups": len(codes)}


def last_predictions(run_dir: Path) -> Path:
    """The per-image table of a run's last evaluation (``eval/<last task>.predictions.csv``)."""
    from lorax.continual.summary import read_metrics

    metrics = read_metrics(run_dir / "metrics.json")
    return run_dir / "eval" / f"{metrics['tasks'][-1]}.predictions.csv"


def run_one(params_path: str, overrides: dict[str, Any], manifests: Path, out: Path) -> dict[str, Any]:
    """One stream through the library; wall seconds recorded once (a reused run keeps its first time)."""
    from lorax.config import load_params
    from pipelines.layout import Layout
    from pipelines.train_stream import prepare_missing, run_stream

    params = load_params(params_path, overrides)
    prepare_missing(params, Layout.run(params, out, manifests))
    wall = out / "wall.json"
    if wall.is_file():  # finished before: the run is reused, its time is the one first measured
        return {**run_stream(params, manifests, out), "wall_s": json.loads(wall.read_text())["wall_s"]}
    segments = open_segment(out)
    metrics = run_stream(params, manifests, out)
    wall_s = close_segments(out, segments)
    return {**metrics, "wall_s": wall_s}


SEGMENTS = "wall.segments.json"


def _last_write(out: Path) -> float:
    """When the run last saved anything under ``out`` (what an interrupted segment's work is worth)."""
    return max((p.stat().st_mtime for p in out.rglob("*") if p.is_file() and p.name != SEGMENTS), default=0.0)


def open_segment(out: Path) -> list[list[float | None]]:
    """Start timing one segment of a run that may be resumed: an earlier segment that never closed (the process was
    killed or stopped) is closed at the run's last write, since work after it was redone. Returns all segments."""
    path = out / SEGMENTS
    segments = json.loads(path.read_text())["segments"] if path.is_file() else []
    if segments and segments[-1][1] is None:
        segments[-1][1] = max(segments[-1][0], _last_write(out))
    segments.append([time.time(), None])
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"segments": segments}))
    return segments


def close_segments(out: Path, segments: list[list[float | None]]) -> float:
    """End the current segment; the run's wall time is every segment's sum (a resumed run counts all its parts),
    written once to ``wall.json``."""
    segments[-1][1] = time.time()
    wall_s = round(sum(end - start for start, end in segments), 1)
    (out / "wall.json").write_text(json.dumps({"wall_s": wall_s, "segments": len(segments)}))
    (out / SEGMENTS).unlink(missing_ok=True)
    return wall_s


def main(argv: list[str] | None = None) -> int:
    from lorax.config import load_params
    from pipelines.cli.settings import add_settings_arguments, parse_overrides

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_settings_arguments(ap, default="params.realworld.yaml")
    ap.add_argument("--protocol", default="realworld", choices=sorted(PROTOCOLS),
                    help="task order and data folder: realworld (six generators) | t2i (seven, paired prompts)")
    ap.add_argument("--floor", action="store_true", help="also time one frozen forward of every training and "
                    "evaluation crop (the physical floor of a stream) in the same run")
    ap.add_argument("--data", help="dataset root (default: the protocol's folder)")
    ap.add_argument("--manifests", help="manifest folder (default: OUT/manifests; prepared when missing)")
    ap.add_argument("--out", default="outputs/realworld")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=CHOICES)
    ap.add_argument("--memory", nargs="+", type=int, help="LoRAX exemplar budgets (default: the params' own "
                    "continual.memory_size, e.g. 2000 in params.realworld.yaml, replaying continual.replay_size)")
    ap.add_argument("--quick", action="store_true", help="2 tasks, tiny random model: a plumbing check")
    args = ap.parse_args(argv)
    out = Path(args.out)
    manifests = Path(args.manifests) if args.manifests else out / "manifests"
    proto = PROTOCOLS[args.protocol]
    tasks = proto["tasks"][:2] if args.quick else proto["tasks"]
    base: dict[str, Any] = {"stream": stream_of(tasks), **(QUICK if args.quick else {}),
                            "data.root": args.data or proto["root"], "tracking.scenario": proto["scenario"]}
    user = parse_overrides(args.set)  # -S wins over the presets and the per-method settings
    rows: dict[str, dict[str, Any]] = {}
    try:
        common = load_params(args.params, {**base, **user})  # the head and the control do not depend on the run
        control = {"eval.resample_control": CONTROL} if common.eval.resample_control is None else {}  # reports both
        if common.eval.jpeg_control is None:
            control["eval.jpeg_control"] = JPEG_CONTROL
        per_method = METHOD_OVERRIDES if common.continual.head != "linear" else {}
        for name, method, size in runs(args.methods, args.memory or [common.continual.memory_size]):
            ov = {**base, **per_method.get(method, {}), "continual.method": method, "continual.memory_size": size,
                  **user, **control}
            rows[name] = run_one(args.params, ov, manifests, out / name)
            m = rows[name]
            print(f"{name}: pooled {m['pooled_acc']:.1f} AAF {m['aaf']:.1f} BWT {m['bwt']:.1f} "
                  f"({m['wall_s']:.0f} s)", flush=True)
    except (ValueError, FileNotFoundError) as e:  # settings and data errors: one line, no traceback
        print(f"benchmarks.realworld: error: {e}")
        return 2
    md = table(rows)
    extra = {}
    probe = next((n for n in rows if n == "probe"), None)
    for name in rows:
        if name.startswith("lorax") and probe is not None:
            ci = paired_bootstrap(last_predictions(out / name), last_predictions(out / probe),
                                  Path(base["data.root"]))
            extra[f"{name} - probe"] = ci
            md += (f"\n{name} minus probe, pooled accuracy: {ci['diff']:+.1f} points, 95% interval "
                   f"[{ci['lo']:+.1f}, {ci['hi']:+.1f}] (bootstrap over {ci['groups']} groups)\n")
    if args.floor:
        from benchmarks.stream_floor import stream_floor

        extra["floor"] = stream_floor(load_params(args.params, {**base, **user}), manifests)
        md += (f"\nFloor (one frozen forward of every training and evaluation crop, same machine, same run): "
               f"{extra['floor']['seconds']:.0f} s for {extra['floor']['crops']} crops\n")
    cmd = f"python -m benchmarks.realworld " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (f"\nPercent, after the last task, on the val split. Views: as is, then each shortcut control. Balanced "
            f"acc and real called real: the model's stored verdict (threshold cross-fitted on training rows + "
            f"memory, never on val); AP threshold-free. {time.strftime('%Y-%m-%d')}, {platform.node()}, "
            f"{platform.processor() or platform.machine()}; `{cmd.strip()}`\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.protocol}.md").write_text(md + note)
    (out / f"{args.protocol}.json").write_text(json.dumps(rows, indent=2))
    if extra:  # LoRAX minus probe intervals, the floor
        (out / f"{args.protocol}.compare.json").write_text(json.dumps(extra, indent=2))
    print(md + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
