"""The CLIP-MoLE ablation's tables (:mod:`benchmarks.detect_ablation` runs them): their rows, one
:class:`Variant` (detector settings) each, and their figures over seeds, as rows of ``ablation.json`` and as
Markdown. Nothing here trains: the grid, the per-variant summary and the rendering only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lorax.config import Params

__all__ = ["GROUPS", "METHODS", "PAPER_BLOCKS", "PAPER_RANKS", "WHERE", "Variant", "ablation_grid", "chance_map",
           "parse_blocks", "parse_rank_set", "render_markdown", "summarize_runs"]

GROUPS = ("design", "blocks", "ranks")
METHODS = ("probe", "shared", "separate", "mole")
WHERE = ("mlp", "attn", "both")
PAPER_BLOCKS = ("1", "2", "3", "4", "5", "all")
PAPER_RANKS = ("4:4/8/16", "8:4/8/16", "16:4/8/16", "8:8/16/32", "8:4/4/4", "8:8/8/8", "8:8/8/8/8", "8:4/8/16/32")


@dataclass(frozen=True)
class Variant:
    """One detector of the ablation; fields a method does not use are normalised away (probe has no adapters)."""

    method: str
    where: str = "mlp"
    blocks: int = 3  # last k blocks, 0 = all
    shared_rank: int = 8
    expert_ranks: tuple[int, ...] = (4, 8, 16)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--methods: unknown detector {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.where not in WHERE:
            raise ValueError(f"--where: {self.where!r}; allowed: {', '.join(WHERE)}")
        norm = {"probe": {"where": "-", "blocks": -1, "shared_rank": 0, "expert_ranks": ()},
                "shared": {"expert_ranks": ()}, "separate": {"shared_rank": 0}}.get(self.method, {})
        for k, v in norm.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "expert_ranks", tuple(int(r) for r in self.expert_ranks))

    @property
    def slug(self) -> str:
        """Folder name: ``mole-mlp-b3-r8_4.8.16``, ``probe``."""
        if self.method == "probe":
            return "probe"
        blocks = "all" if self.blocks == 0 else str(self.blocks)
        ranks = f"{self.shared_rank}_{'.'.join(map(str, self.expert_ranks)) or '-'}"
        return f"{self.method}-{self.where}-b{blocks}-r{ranks}"

    @property
    def ranks_label(self) -> str:
        if self.method == "probe":
            return "-"
        return f"{self.shared_rank or '-'} : {'/'.join(map(str, self.expert_ranks)) or '-'}"

    def overrides(self) -> dict[str, Any]:
        """``detect.*`` settings of this variant (probe keeps the reference adapter settings: it has none)."""
        if self.method == "probe":
            return {"detect.method": "probe"}
        return {"detect.method": self.method, "detect.where": self.where, "detect.blocks": self.blocks,
                "detect.shared_rank": self.shared_rank, "detect.expert_ranks": list(self.expert_ranks)}


def parse_blocks(item: str) -> int:
    """``3`` -> 3, ``all`` -> 0 (detect.blocks)."""
    s = str(item).strip().lower()
    if s == "all":
        return 0
    try:
        k = int(s)
    except ValueError:
        raise ValueError(f"--blocks {item!r}: expected a number of last blocks (1, 2, ...) or 'all'") from None
    if k < 1:
        raise ValueError(f"--blocks {item!r}: must be >= 1 (or 'all')")
    return k


def parse_rank_set(item: str) -> tuple[int, tuple[int, ...]]:
    """``8:4/8/16`` -> (8, (4, 8, 16)): shared rank, then the experts' ranks."""
    shared, sep, experts = str(item).partition(":")
    try:
        if not sep:
            raise ValueError
        s = int(shared)
        e = tuple(int(r) for r in experts.split("/") if r.strip())
    except ValueError:
        raise ValueError(f"--ranks {item!r}: expected SHARED:E1/E2/..., e.g. 8:4/8/16") from None
    if s < 1 or not e or any(r < 1 for r in e):
        raise ValueError(f"--ranks {item!r}: MoLE needs a shared rank >= 1 and at least one expert rank >= 1")
    return s, e


def ablation_grid(
    params: Params,
    groups: Iterable[str] = GROUPS,
    methods: Iterable[str] = METHODS,
    where: Iterable[str] = WHERE,
    where_methods: Iterable[str] = ("shared", "mole"),
    blocks: Iterable[str] = PAPER_BLOCKS,
    ranks: Iterable[str] = PAPER_RANKS,
) -> dict[str, list[Variant]]:
    """``{group: [variants in table order]}``, each one factor away from the reference ``params.detect``."""
    cfg = params.detect
    ref = Variant("mole", cfg.where, cfg.blocks, cfg.shared_rank, tuple(cfg.expert_ranks))
    groups = list(groups)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"--groups: unknown {bad}; allowed: {', '.join(GROUPS)}")

    def like(**kw: Any) -> Variant:
        return Variant(**{**asdict(ref), **kw})

    tables: dict[str, list[Variant]] = {}
    if "design" in groups:
        rows = [like(method=m) for m in methods]
        rows += [like(method=m, where=w) for m in where_methods for w in where if w != ref.where]
        tables["design"] = rows
    if "blocks" in groups:
        tables["blocks"] = [like(blocks=parse_blocks(b)) for b in blocks]
    if "ranks" in groups:
        tables["ranks"] = [like(shared_rank=s, expert_ranks=e) for s, e in map(parse_rank_set, ranks)]
    for g, rows in tables.items():  # keep the first of duplicates, in order
        seen: set[Variant] = set()
        tables[g] = [v for v in rows if not (v in seen or seen.add(v))]
        if not tables[g]:
            raise ValueError(f"ablation group {g!r} has no variants; give its values or leave it out of --groups")
    return tables


def _stat(values: Sequence[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarize_runs(variant: Variant, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row: the variant's settings and its figures over seeds (mean, std, n)."""
    first = runs[0]
    gens = list(first["per_generator"])
    row = {
        "variant": variant.slug,
        **asdict(variant),
        "trainable_params": first["trainable_params"],
        "trainable_pct": 100.0 * first["trainable_params"] / max(first["backbone_params"], 1),
        "map": _stat([r["map"] for r in runs]),
        "mean_acc": _stat([r["mean_acc"] for r in runs]),
        "seen_map": _stat([_mean([m.get("ap") for m in r["seen"].values()]) for r in runs]),
        "ap": {g: _stat([r["per_generator"][g]["ap"] for r in runs]) for g in gens},
        "extra": {name: {"map": _stat([r["extra"][name]["map"] for r in runs]),
                         "mean_acc": _stat([r["extra"][name]["mean_acc"] for r in runs])}
                  for name in first.get("extra", {})},
        "train_seconds": _stat([r["train_seconds"] for r in runs]),
        "seeds": [r.get("seed") for r in runs],
    }
    return row


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def chance_map(metrics: dict[str, Any]) -> dict[str, float | None]:
    """mAP of an uninformative score (AP = share of fakes), for the unseen generators and each extra set."""
    def share(per_generator: dict[str, Any]) -> float | None:
        return _mean([100.0 * m["n_fake"] / max(m["n_fake"] + m["n_real"], 1) for m in per_generator.values()
                      if "n_fake" in m])

    if not metrics:
        return {}
    out = {"unseen": share(metrics.get("per_generator", {}))}
    out.update({name: share(res.get("per_generator", {})) for name, res in (metrics.get("extra") or {}).items()})
    return out


_TITLES = {
    "design": "Adapter design (paper Table 5; probe = UnivFD linear probe, the paper's 'None')",
    "blocks": "Adapted blocks (paper Table 4), MoLE",
    "ranks": "LoRA ranks (paper Table 6), MoLE: shared rank : expert ranks",
}
_WHERE_NAMES = {"mlp": "MLP", "attn": "attention", "both": "MLP + attention"}
_METHOD_NAMES = {"probe": "linear probe", "shared": "shared LoRA only", "separate": "separate experts only",
                 "mole": "MoLE (shared + experts)"}


def _fmt(s: dict[str, Any] | None, digits: int = 2) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    if s.get("n", 1) > 1:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def _label(group: str, v: Variant) -> str:
    if group == "blocks":
        return "all" if v.blocks == 0 else f"last {v.blocks}"
    if group == "ranks":
        return v.ranks_label
    if v.method == "probe":
        return _METHOD_NAMES["probe"]
    return f"{_METHOD_NAMES[v.method]}, {_WHERE_NAMES[v.where]}"


def render_markdown(summary: dict[str, Any], tables: dict[str, list[Variant]]) -> str:
    rows = summary["rows"]
    gens = summary["eval_tasks"]
    extra = list(summary["extra_sets"])
    n = len(summary["seeds"])
    lines = [
        "# CLIP-MoLE ablation",
        "",
        f"Backbone `{summary['backbone']}` (weights: {summary['pretrained'] or 'random init'}), crop "
        f"{summary['img_size']} px, {summary['epochs']} epochs; trained on {', '.join(summary['train_tasks'])}, "
        f"evaluated on the unseen {', '.join(gens) or '?'}; {n} seed{'s' if n > 1 else ''} "
        f"({', '.join(map(str, summary['seeds']))}){', mean ± std' if n > 1 else ''}. AP and accuracy in %.",
        f"Reference: {summary['reference']}.",
    ]
    chance = summary.get("chance_map") or {}
    if chance.get("unseen") is not None:
        lines.append("Chance level (mAP of an uninformative score = share of fakes): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in chance.items() if v is not None) + ".")
    if summary.get("command"):
        lines += ["", f"Command: `{summary['command']}`"]
    if not summary["complete"]:
        lines += ["", "**Incomplete**: rows still running or not run are missing."]
    head = ["variant", "trainable %", "mAP unseen", "acc unseen", *[f"AP {g}" for g in gens], "mAP seen (val)",
            *[f"mAP {e}" for e in extra], "train s"]
    for group, variants in tables.items():
        lines += ["", f"## {_TITLES[group]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v in variants:
            r = rows.get(v.slug)
            if r is None:
                continue
            cells = [_label(group, v), f"{r['trainable_pct']:.3f}", _fmt(r["map"]), _fmt(r["mean_acc"]),
                     *[_fmt(r["ap"].get(g), 1) for g in gens], _fmt(r["seen_map"]),
                     *[_fmt(r["extra"].get(e, {}).get("map")) for e in extra], _fmt(r["train_seconds"], 0)]
            lines.append("| " + " | ".join(cells) + " |")
    ref_where = summary["reference"]["where"]
    design = [rows[v.slug] for v in tables.get("design", []) if v.slug in rows and v.where in (ref_where, "-")]
    if design:
        order = sorted(design, key=lambda r: -(r["map"]["mean"] if r["map"]["mean"] is not None else -1))
        lines += ["", f"Ordering by unseen mAP (design table, {ref_where} adapters): " + " > ".join(
            f"{r['method']} {_fmt(r['map'])}" for r in order) + "."]
    return "\n".join(lines) + "\n"

