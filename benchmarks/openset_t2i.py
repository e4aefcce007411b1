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
sixth task, which never saw ddb.

    python -m benchmarks.openset_t2i --store outputs/t2i/probe/cache/embeddings --out outputs/openset_t2i
    python -m benchmarks.openset_t2i --state outputs/t2i/lorax-m500/state/kandinsky3 --held ddb \
        --out outputs/openset_t2i_lorax
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


def leave_one_out(feats: dict[str, dict[str, np.ndarray]], manifests: dict, seed: int = 0) -> dict[str, Any]:
    """Per left-out task: AUROC of its val fakes (and of all its val images) against the known test set, and the
    flag rates at the threshold. ``feats[task]``: features of that task's manifest rows, in row order."""
    from sklearn.metrics import roc_auc_score

    from lorax.serving.openset import MAX_PER_CLASS, calibration_rows, fit, set_threshold
    from lorax.serving.scan import val_halves

    tasks = list(manifests)
    out: dict[str, Any] = {}
    for held in tasks:
        known = [t for t in tasks if t != held]
        rows = calibration_rows({t: manifests[t] for t in known}, known, "train", MAX_PER_CLASS, seed)
        # calibration_rows renumbers the rows: their manifest index travels in the "_row" column
        parts, labels = [], []
        for i, t in enumerate(known):
            sub = rows[rows["class_id"] // 2 == i]
            parts.append(feats[t][manifests[t].index.get_indexer(sub["_row"])])
            labels.append(sub["class_id"].to_numpy())
        x, y = np.concatenate(parts), np.concatenate(labels)
        cal, test = [], []
        for t in known:
            half, rest = val_halves(manifests[t], seed)
            cal.append(feats[t][manifests[t].index.get_indexer(half.index)])
            test.append(feats[t][manifests[t].index.get_indexer(rest.index)])
        stats = set_threshold(fit(x, y, 2 * len(known)), np.concatenate(cal))
        s_known = stats.score(np.concatenate(test))
        hv = manifests[held][manifests[held]["split"] == "val"]
        s_val = stats.score(feats[held][manifests[held].index.get_indexer(hv.index)])
        is_fake = hv["label"].astype(int).to_numpy() == 1

        def auroc(s_u: np.ndarray) -> float:
            return float(roc_auc_score(np.r_[np.zeros(len(s_known)), np.ones(len(s_u))], np.r_[s_known, s_u]))

        out[held] = {"auroc_fakes": auroc(s_val[is_fake]), "auroc_all_val": auroc(s_val),
                     "auroc_reals": auroc(s_val[~is_fake]),
                     "fakes_flagged": float((s_val[is_fake] > stats.threshold).mean()),
                     "reals_flagged": float((s_val[~is_fake] > stats.threshold).mean()),
                     "known_flagged": float((s_known > stats.threshold).mean()),
                     "n_fakes": int(is_fake.sum()), "n_known_test": int(len(s_known)),
                     "threshold": stats.threshold, "dim": stats.meta["dim"]}
    return out


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(ap, default="params.realworld.yaml")
    ap.add_argument("--data", default="../shared/data/t2i", help="dataset root (CDDB layout)")
    ap.add_argument("--tasks", nargs="+", default=PROTOCOL_T2I)
    ap.add_argument("--manifests", default="outputs/t2i/manifests", help="prepared manifests (prepared when missing)")
    ap.add_argument("--store", default="outputs/t2i/probe/cache/embeddings", help="the probe's embedding store")
    ap.add_argument("--state", help="a trained stream's state folder: measure its own super-features instead")
    ap.add_argument("--held", nargs="+", help="with --state: the generators it never saw")
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
    feats = probe_features(p, manifests, Path(args.store))
    manifests = {t: df.assign(_row=df.index) for t, df in manifests.items()}
    res = leave_one_out(feats, manifests, seed=p.seed)
    (out / "openset.json").write_text(json.dumps({"generators": res, "seconds": round(time.time() - t0, 1)},
                                                 indent=2))
    md = markdown(res, "the probe's super-feature")
    (out / "openset.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
