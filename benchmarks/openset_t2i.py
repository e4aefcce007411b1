"""Open-set on real generators, leave one out: ``python -m benchmarks.openset_t2i``.

For each generator of a real-image protocol in turn (default t2i's seven), the open-set score that ``lorax scan``
uses (:mod:`lorax.serving.openset`: minimum class Mahalanobis distance, shared Ledoit-Wolf covariance, threshold at
the 95th percentile of known val scores) is fitted on the OTHER generators' train images (at most 200 per class,
their 2 x (T-1) classes) with the threshold on half of their val images; the other half is the known test set. The
left-out generator's val fakes (and, separately, its whole val split) are the unknown: AUROC against the known test
set, and the share of its fakes above the threshold (what the scan flags before its "called fake" condition).

The features are the probe's super-feature of the profile (``params.realworld.yaml``: frozen DINOv2-S, levels 4 + 8,
residual spectrum, the eval view's crops averaged): the same features a LoRAX stream's shared part sees, read from
(or added to) the embedding store of a probe stream (``--store``), so the seven folds cost one feature pass.
With ``--state DIR --held NAME`` the same is measured on a trained stream's own super-features
(:func:`lorax.serving.scan.evaluate_heldout`, the Predictor's path), e.g. the t2i LoRAX stream's state after its
sixth task, which never saw ddb. With ``--stream OUT/<method>/state`` every next-generator case of the stream is
measured the same way on its own states (:func:`next_generator`), with the features through the stream's feature
store (``-S cache.dir=`` its cache) instead of the Predictor: Mahalanobis on the whole super-feature and, for
``lorax+trace``, on its adapter and trace-expert parts alone.

    python -m benchmarks.openset_t2i --store outputs/t2i/probe/cache/embeddings --out outputs/openset_t2i
    python -m benchmarks.openset_t2i --state outputs/t2i/lorax-m500/state/kandinsky3 --held ddb \
        --out outputs/openset_t2i_lorax
    python -m benchmarks.openset_t2i --stream outputs/t2i/lorax+trace/state --manifests outputs/t2i/manifests \
        -S cache.dir=CACHE --out outputs/openset_t2i_stream
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from lorax.config import load_params
from pipelines.cli.settings import add_settings_arguments, parse_overrides

PROTOCOL_T2I = ["sd15", "sd21", "sdxl", "pixart512", "playground", "kandinsky3", "ddb"]


def leave_one_out(feats: dict[str, np.ndarray], manifests: dict, seed: int = 0) -> dict[str, Any]:
    """Per left-out task: AUROC of its val fakes (and of all its val images) against the known test set, and the
    flag rates at the threshold. ``feats[task]``: features of that task's manifest rows, in row order."""
    tasks = list(manifests)
    return {held: heldout_case(feats, manifests, [t for t in tasks if t != held], held, seed) for held in tasks}


def heldout_case(feats: dict[str, np.ndarray], manifests: dict, known: list[str], held: str, seed: int = 0,
                 columns: np.ndarray | None = None, logits: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """One held-out generator against the ``known`` tasks, as :func:`lorax.serving.scan.evaluate_heldout` scores it:
    the open-set statistics fitted on the known tasks' calibration train rows (at most ``MAX_PER_CLASS`` per class),
    the threshold on one half of their val rows, the other half the known test set; ``held``'s val fakes (and all
    its val rows) the unknown. ``feats[task]``: features of the task's manifest rows in row order (rows a case never
    reads may hold anything); ``columns``: the feature columns the case reads (default all); ``logits`` (rows as
    ``feats``): the model's, for the energy and max-softmax baselines' AUROC of the fakes."""
    from lorax.serving.openset import MAX_PER_CLASS, calibration_rows, fit, set_threshold
    from lorax.serving.scan import energy_score, msp_score, val_halves

    cols = slice(None) if columns is None else columns

    def of(t: str, index) -> np.ndarray:
        return feats[t][manifests[t].index.get_indexer(index)][:, cols]

    # calibration_rows renumbers the rows: their manifest index travels in the "_row" column
    rows = calibration_rows({t: manifests[t].assign(_row=manifests[t].index) for t in known}, known, "train",
                            MAX_PER_CLASS, seed)
    parts, labels = [], []
    for i, t in enumerate(known):
        sub = rows[rows["class_id"] // 2 == i]
        parts.append(of(t, sub["_row"]))
        labels.append(sub["class_id"].to_numpy())
    x, y = np.concatenate(parts), np.concatenate(labels)
    halves = {t: val_halves(manifests[t], seed) for t in known}
    cal = [of(t, half.index) for t, (half, _) in halves.items()]
    test = [of(t, rest.index) for t, (_, rest) in halves.items()]
    stats = set_threshold(fit(x, y, 2 * len(known)), np.concatenate(cal))
    s_known = stats.score(np.concatenate(test))
    hv = manifests[held][manifests[held]["split"] == "val"]
    s_val = stats.score(of(held, hv.index))
    is_fake = hv["label"].astype(int).to_numpy() == 1

    def auroc(s_u: np.ndarray) -> float:
        return auroc_of(s_known, s_u)

    out = {}
    if logits is not None:
        def lg(t: str, index) -> np.ndarray:
            return logits[t][manifests[t].index.get_indexer(index)]

        known_lg = np.concatenate([lg(t, rest.index) for t, (_, rest) in halves.items()])
        fake_lg = lg(held, hv.index[is_fake])
        for name, score in (("energy", energy_score), ("msp", msp_score)):
            out[f"auroc_{name}_fakes"] = auroc_of(score(known_lg), score(fake_lg))
    return {**out, "auroc_fakes": auroc(s_val[is_fake]), "auroc_all_val": auroc(s_val),
            "auroc_reals": auroc(s_val[~is_fake]),
            "fakes_flagged": float((s_val[is_fake] > stats.threshold).mean()),
            "reals_flagged": float((s_val[~is_fake] > stats.threshold).mean()),
            "known_flagged": float((s_known > stats.threshold).mean()),
            "n_fakes": int(is_fake.sum()), "n_known_test": int(len(s_known)),
            "threshold": stats.threshold, "dim": stats.meta["dim"]}


def auroc_of(known: np.ndarray, unknown: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(unknown))], np.r_[known, unknown]))


def feature_parts(method: Any, params: Any) -> dict[str, np.ndarray | None]:
    """Columns of a method's super-feature by part: ``all`` (None: every column), and for the methods whose
    super-feature is per-task slices in task order, ``adapters`` and ``traces`` (``lorax+trace``: each slice is the
    adapter's embedding then the trace expert's)."""
    width = len(method.tasks)
    parts: dict[str, np.ndarray | None] = {"all": None}
    if method.name == "lorax+trace":
        a, d = method.net.embed_dim, params.trace.dim
        c = np.arange(width * (a + d)) % (a + d)
        parts.update(adapters=np.flatnonzero(c < a), traces=np.flatnonzero(c >= a))
    return parts


def next_generator(state_root: Path, tasks: list[str], manifests: dict, cache: Any, seed: int = 0) -> dict[str, Any]:
    """Open-set on a trained stream's own states, next generator: for each task h after the first, the state after
    task h-1 (``state_root/<tasks[h-1]>``) against h's val images, as :func:`lorax.serving.scan.evaluate_heldout`
    measures it (the same rows, statistics and threshold), per part of the super-feature (:func:`feature_parts`),
    with the energy and max-softmax baselines of the state's own logits. Features come from the evaluation path
    (:func:`lorax.continual.evaluation.predict_logits`) through the feature store of ``cache`` (the stream's
    ``cache:`` settings): a frozen adapter or expert is the same producer in every state that holds it, so after
    one pass of the last state over every row the cases read the store instead of the Predictor re-running every
    image through every state."""
    import pandas as pd

    from lorax.continual.evaluation import predict_logits
    from lorax.continual.state import load_state
    from lorax.features import open_store
    from lorax.serving.openset import MAX_PER_CLASS, calibration_rows

    store = open_store(cache)

    def needed(known: list[str], held: str | None) -> dict[str, pd.DataFrame]:
        ms = {t: manifests[t].assign(_row=manifests[t].index) for t in known}
        rows = calibration_rows(ms, known, "train", MAX_PER_CLASS, seed)
        out = {}
        for i, t in enumerate(known):
            idx = pd.Index(rows.loc[rows["class_id"] // 2 == i, "_row"]).union(
                manifests[t].index[manifests[t]["split"] == "val"])
            out[t] = manifests[t].loc[idx]
        if held is not None:
            out[held] = manifests[held][manifests[held]["split"] == "val"]
        return out

    def run(state: Path, rows: dict[str, pd.DataFrame]) -> tuple[Any, dict, dict]:
        method, _ = load_state(state)
        p = method.params.model_copy(deep=True)
        p.cache = cache
        df = pd.concat(rows.values())
        lg, ft = predict_logits(method, df, p, features=True, desc=f"features ({state.name})", store=store)
        feats, logits, at = {}, {}, 0
        for t, d in rows.items():
            f = np.full((len(manifests[t]), ft.shape[1]), np.nan, np.float32)
            g = np.full((len(manifests[t]), lg.shape[1]), np.nan, np.float32)
            pos = manifests[t].index.get_indexer(d.index)
            f[pos], g[pos] = ft[at:at + len(d)], lg[at:at + len(d)]
            feats[t], logits[t], at = f, g, at + len(d)
        return (method, p), feats, logits

    t0 = time.time()
    run(state_root / tasks[-1], needed(tasks[:-1], tasks[-1]))  # fills the store: each image decoded once
    report: dict[str, Any] = {"warm_seconds": round(time.time() - t0, 1), "generators": {}}
    for h in range(1, len(tasks)):
        t0 = time.time()
        known, held = tasks[:h], tasks[h]
        (method, p), feats, logits = run(state_root / tasks[h - 1], needed(known, held))
        case = {part: heldout_case(feats, manifests, known, held, seed, cols, logits if part == "all" else None)
                for part, cols in feature_parts(method, p).items()}
        report["generators"][held] = {"known": known, **case, "seconds": round(time.time() - t0, 1)}
        print(json.dumps({held: {part: round(100 * c["auroc_fakes"], 1) for part, c in case.items()}}), flush=True)
    return report


def probe_features(params, manifests: dict, store_dir: Path) -> dict[str, np.ndarray]:
    """The probe's eval-view super-feature of every manifest row (stored ones read, the rest computed and added)."""
    from lorax.continual.evaluation import predict_logits
    from lorax.continual.methods import build_method
    from lorax.features.store import FeatureStore

    method = build_method(params, list(manifests))
    store = FeatureStore(store_dir)
    return {t: predict_logits(method, df, params, features=True, desc=f"features {t}", store=store)[1]
            for t, df in manifests.items()}


def markdown(res: dict[str, Any], what: str) -> str:
    lines = [f"Open-set, leave one generator out ({what}): AUROC of the left-out generator's val images against "
             "the known generators' held-out val images; flagged = above the scan's threshold (95th percentile of "
             "known val scores)", "",
             "| left out | AUROC fakes | AUROC all val | AUROC real photos | fakes flagged | known flagged |",
             "|---|---|---|---|---|---|"]
    for g, m in res.items():
        lines.append(f"| {g} | {100 * m['auroc_fakes']:.1f} | {100 * m['auroc_all_val']:.1f} | "
                     f"{100 * m['auroc_reals']:.1f} | {100 * m['fakes_flagged']:.1f}% | "
                     f"{100 * m['known_flagged']:.1f}% |")
    mean = np.mean([m["auroc_fakes"] for m in res.values()])
    lines += ["", f"Mean AUROC (fakes): {100 * mean:.1f}; min {100 * min(m['auroc_fakes'] for m in res.values()):.1f}"]
    return "\n".join(lines) + "\n"


def next_markdown(r: dict[str, Any]) -> str:
    """The next-generator table: AUROC of the new generator's val fakes per score, and the flag rates."""
    gens = r["generators"]
    parts = [k for k in next(iter(gens.values())) if k not in ("known", "seconds")] if gens else []
    head = ["next generator (known tasks)", *[f"Mahalanobis ({k})" for k in parts], "energy", "MSP",
            "fakes flagged", "known flagged", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, m in gens.items():
        a = m["all"]
        lines.append(f"| {g} ({len(m['known'])}) | " + " | ".join(f"{100 * m[k]['auroc_fakes']:.1f}" for k in parts)
                     + f" | {100 * a['auroc_energy_fakes']:.1f} | {100 * a['auroc_msp_fakes']:.1f} | "
                     f"{100 * a['fakes_flagged']:.1f}% | {100 * a['known_flagged']:.1f}% | {m['seconds']} |")
    if gens:
        lines.append("")
        lines.append("Mean AUROC (fakes): " + ", ".join(
            f"{k} {100 * np.mean([m[k]['auroc_fakes'] for m in gens.values()]):.1f}" for k in parts))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(ap, default="params.realworld.yaml")
    ap.add_argument("--data", default="../shared/data/t2i", help="dataset root (CDDB layout)")
    ap.add_argument("--tasks", nargs="+", default=PROTOCOL_T2I)
    ap.add_argument("--manifests", default="outputs/t2i/manifests", help="prepared manifests (prepared when missing)")
    ap.add_argument("--store", default="outputs/t2i/probe/cache/embeddings", help="the probe's embedding store")
    ap.add_argument("--state", help="a trained stream's state folder: measure its own super-features instead")
    ap.add_argument("--held", nargs="+", help="with --state: the generators it never saw")
    ap.add_argument("--stream", help="a trained stream's state root (OUT/<method>/state): every next-generator "
                    "case of --tasks (their stream order) on the stream's own states, features through the store of "
                    "the cache settings (-S cache.dir=... the stream's)")
    ap.add_argument("--out", default="outputs/openset_t2i")
    args = ap.parse_args(argv)
    from lorax.data.manifest import load_stream_manifests, manifest_path, read_manifest
    from lorax.data.prepare import prepare_tasks

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks
    stream = {t: {"prev": "init" if i == 0 else tasks[i - 1]} for i, t in enumerate(tasks)}
    p = load_params(args.params, {"data.root": args.data, "stream": stream, "continual.method": "probe",
                                  **parse_overrides(args.set)})
    if any(not manifest_path(args.manifests, t).is_file() for t in tasks):
        prepare_tasks(p.data.root, tasks, args.manifests, p.data, p.model.img_size)
    t0 = time.time()
    if args.state:
        from lorax.serving.predict import Predictor
        from lorax.serving.scan import evaluate_heldout

        predictor = Predictor.from_state(args.state, device=p.train.device, openset=None)
        known = load_stream_manifests(args.manifests, list(predictor.tasks), p.data.root)
        held = {g: read_manifest(manifest_path(args.manifests, g), p.data.root) for g in args.held or []}
        held = {g: df[df["split"] == "val"] for g, df in held.items()}
        r = evaluate_heldout(predictor, known, held, out / "scans", seed=p.seed)
        r["seconds"] = round(time.time() - t0, 1)
        (out / "openset.json").write_text(json.dumps(r, indent=2, default=str))
        print(json.dumps({g: m["auroc"] for g, m in r["generators"].items()}, indent=2))
        return 0
    manifests = load_stream_manifests(args.manifests, tasks, p.data.root)
    if args.stream:
        r = next_generator(Path(args.stream), tasks, manifests, p.cache, seed=p.seed)
        r["seconds"] = round(time.time() - t0, 1)
        (out / "openset.json").write_text(json.dumps(r, indent=2, default=str))
        md = next_markdown(r)
        (out / "openset.md").write_text(md)
        print(md)
        return 0
    feats = probe_features(p, manifests, Path(args.store))
    res = leave_one_out(feats, manifests, seed=p.seed)
    (out / "openset.json").write_text(json.dumps({"generators": res, "seconds": round(time.time() - t0, 1)},
                                                 indent=2))
    md = markdown(res, "the probe's super-feature")
    (out / "openset.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
