"""Plain-text summaries of what a run produced, printed at the end of ``python -m pipelines.flows`` and
``lorax train`` instead of a raw dict: one row per registered version, the stream's headline figures and its
accuracy matrix.

The formatters read only keys they know and show any other scalar key of a row in extra columns, so a flow that
returns more (a parent version, gate figures) is shown without a change here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the columns of a version row, in this order; other scalar keys follow; these never become columns
VERSION_COLUMNS = ("version", "task", "tasks", "parent", "aaf", "gate", "union", "aliases")
NOT_COLUMNS = {"gate_reason", "base", "registered_now", "skipped", "summary", "state_id", "gate_figures", "prepared",
               "dvc_lock"}


def cell(v: Any) -> str:
    """One value as table text: floats to 2 decimals, lists joined, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return ",".join(cell(x) for x in v) or "-"
    return str(v)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as a left-aligned text table of ``columns`` (a header, a rule, one line per row)."""
    text = [[c for c in columns]] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in text) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in text]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def format_versions(versions: list[dict[str, Any]]) -> str:
    """One row per registered version (a flow's ``run_register`` results): its newest task, how many tasks it
    holds, the parent version, AAF, the gate and aliases, then any other scalar figure; each gate's reason below."""
    if not versions:
        return "no version registered"
    rows = [{**v, **({"task": v.get("task") or (v.get("tasks") or [None])[-1], "tasks": len(v.get("tasks") or [])}
                     if "tasks" in v else {}), **_union(v)} for v in versions]
    extra = sorted({k for r in rows for k, v in r.items()
                    if k not in VERSION_COLUMNS and k not in NOT_COLUMNS and _is_scalar(v)})
    columns = [c for c in VERSION_COLUMNS if any(c in r for r in rows)] + extra
    reasons = [f"v{r.get('version')} gate {r.get('gate')}: {r['gate_reason']}" for r in rows if r.get("gate_reason")]
    return "\n".join([table(rows, columns), *reasons])


def _union(v: dict[str, Any]) -> dict[str, str]:
    """The gate's headline figure: pooled accuracy on the union of the tasks, this version / the champion's."""
    f = v.get("gate_figures") or {}
    pooled = f.get("pooled") if isinstance(f, dict) else None
    return {"union": f"{pooled['candidate']:.1f}/{pooled['champion']:.1f}"} if pooled else {}


def format_stream(metrics: dict[str, Any]) -> str:
    """The stream's figures: the accuracy matrix (when ``metrics`` holds it: metrics.json with its details file)
    and the headline figures (metrics.json's keys), one per line."""
    from lorax.continual.summary import format_matrix, split_metrics

    parts = [format_matrix(metrics)] if metrics.get("acc_matrix") and metrics.get("tasks") else []
    scalars = {k: v for k, v in split_metrics(metrics)[0].items() if _is_scalar(v)}
    if scalars:
        width = max(len(k) for k in scalars)
        parts.append("\n".join(f"{k:<{width}}  {cell(v)}" for k, v in scalars.items()))
    return "\n\n".join(parts)


def _stream_file(path: str | Path) -> str:
    from lorax.continual.summary import read_metrics

    p = Path(path)
    if not p.is_file():
        return f"metrics: {p} (not written)"
    return f"{format_stream(read_metrics(p))}\n\nmetrics: {p}"


def format_result(result: dict[str, Any]) -> str:
    """Any flow's result as text: the continual flow (versions + the stream's metrics), the new-generator flow, the
    watch flow (each task it learned, the inbox scan) and the detect flow (the detector and its version)."""
    if "versions" in result:
        return "\n\n".join([format_versions(result["versions"]), _stream_file(result["metrics"])])
    if "detect" in result:
        detect = {k: v for k, v in result["detect"].items() if _is_scalar(v)}
        detect["train_tasks"] = result["detect"].get("train_tasks")
        version = result.get("version") or {}
        return "\n\n".join([table([detect], list(detect)), format_versions([version]) if version else ""]).strip()
    if "trained" in result:
        lines = [f"watch: {result['skipped']}"] if result.get("skipped") else []
        done = [r for r in result["trained"] if not r.get("skipped")]
        lines += [f"{r['task']}: skipped ({r['skipped']}, v{r.get('version')})"
                  for r in result["trained"] if r.get("skipped")]
        lines.append(format_versions(done) if done else "watch: no new task folder learned")
        scan = result.get("scan")
        if scan:
            names = [c.get("name") for c in scan.get("candidates") or []]
            lines.append(f"inbox scan: {scan.get('n_images')} images, {scan.get('n_flagged')} flagged as unknown "
                         f"generator, candidates {', '.join(map(str, names)) or 'none'} -> {scan.get('out')}")
        return "\n".join(lines)
    if "task" in result:
        if result.get("skipped"):
            return f"{result['task']}: skipped ({result['skipped']}, v{result.get('version')})"
        return format_versions([result])
    return "\n".join(f"{k}: {cell(v)}" for k, v in result.items())
