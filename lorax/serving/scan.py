"""``lorax scan INBOX``: find images from unknown generators and group them into candidate tasks for a person.

Every inbox image is predicted (:mod:`lorax.serving.predict`); the ones the open-set score flags
(:mod:`lorax.serving.openset`) are clustered in the calibration's whitened feature space (Ward agglomerative
clustering, the number of groups chosen by silhouette; one group when no split beats structureless data), and every
group of at least ``min_group`` images becomes a candidate task folder in the CDDB layout::

    OUT/candidate_01/train/1_fake/<copies>   flagged images of group 1 (copied, never moved)
    OUT/candidate_01/README.md               files, scores, nearest known classes, what to do next
    OUT/scan.json                            summary: groups, members, scores; ungrouped flagged images
    OUT/predictions.csv                      the predictions of every inbox image

A person confirms a candidate (adds real images as ``0_real``, a ``val`` split, names it) and appends it to the
stream as a new task.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorax.serving.errors import ServingError
from lorax.serving.inputs import collect_inputs
from lorax.serving.predict import Predictor
from lorax.serving.schema import write_csv
from lorax.utils.io import write_json

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

MAX_GROUPS = 8
MIN_GROUP = 3
SILHOUETTE_MARGIN = 0.1
SCAN_FILE = "scan.json"


def _best_split(z: np.ndarray, ks: range) -> tuple[float, int, np.ndarray, dict[int, float]]:
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    best = (-1.0, 1, np.zeros(len(z), dtype=np.int64))
    tried = {}
    for k in ks:
        lab = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z)
        s = float(silhouette_score(z, lab))
        tried[k] = round(s, 4)
        if s > best[0]:
            best = (s, k, lab)
    return best[0], best[1], best[2], tried


def _null_reference(z: np.ndarray, seed: int) -> np.ndarray:
    """A single Gaussian with the data's mean and covariance: what "no groups" looks like in this dimension."""
    rng = np.random.default_rng(seed)
    zc = z - z.mean(0)
    _, sv, vt = np.linalg.svd(zc, full_matrices=False)
    return z.mean(0) + (rng.standard_normal((len(z), len(sv))) * sv / np.sqrt(max(len(z) - 1, 1))) @ vt


def cluster(z: np.ndarray, max_groups: int = MAX_GROUPS, min_group: int = MIN_GROUP,
            margin: float = SILHOUETTE_MARGIN, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Group rows of ``z``: Ward clustering with k in 2..max_groups picked by silhouette.

    The split is kept only when its silhouette beats, by ``margin``, the best silhouette of the same procedure on
    a single Gaussian with the data's covariance (silhouettes of structureless data grow as the dimension shrinks,
    so a fixed cut-off cannot tell "one group" from "several"); else, or with fewer than ``2 * min_group`` rows,
    everything is one group. Returns labels (0..k-1, largest group first) and a note of what was tried.
    """
    n = len(z)
    note: dict[str, Any] = {"k": 1, "silhouette": {}, "null_silhouette": None, "margin": margin}
    labels = np.zeros(n, dtype=np.int64)
    if n >= 2 * min_group:
        ks = range(2, min(max_groups, n - 1) + 1)
        s, k, lab, tried = _best_split(z, ks)
        null_s = _best_split(_null_reference(z, seed), ks)[0]
        note.update(silhouette=tried, null_silhouette=round(null_s, 4))
        if s >= null_s + margin:
            note["k"], labels = k, lab
    sizes = np.bincount(labels, minlength=note["k"])
    order = np.argsort(-sizes, kind="stable")
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[labels], note


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        ours = (out / SCAN_FILE).is_file()
        if not overwrite or not ours:
            raise ServingError(
                f"{out}: folder is not empty; choose a new --out folder"
                + (" or pass --overwrite to replace the previous scan" if ours else "")
            )
        for p in out.iterdir():
            if p.is_dir() and p.name.startswith("candidate_"):
                shutil.rmtree(p)
            elif p.name in (SCAN_FILE, "predictions.csv"):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _readme(name: str, members: list[dict[str, Any]], threshold: float) -> str:
    lines = [
        f"# {name}: candidate new generator",
        "",
        f"{len(members)} inbox images flagged as fakes from no known generator (open-set score above the "
        f"threshold {threshold:.3f}) and grouped together by their features. Copies are in `train/1_fake/`.",
        "",
        "To make it a task: check the images, add real images of the same domain as `train/0_real/`, move part of "
        "both into `val/`, rename the folder after the generator, and append it to the stream "
        "(`lorax stream add NAME`).",
        "",
        "| file | unknown score | fake prob. | nearest known class | source |",
        "|---|---|---|---|---|",
    ]
    for m in members:
        lines.append(f"| {m['file']} | {m['unknown_score']:.3f} | {m['fake_probability']:.3f} | "
                     f"{m['nearest_class']} | {m['source']} |")
    return "\n".join(lines) + "\n"


def scan_inbox(predictor: Predictor, inbox: list[str | Path], out: str | Path, *, min_group: int = MIN_GROUP,
               max_groups: int = MAX_GROUPS, overwrite: bool = False, follow_links: bool = False) -> dict[str, Any]:
    """Predict every image under ``inbox``, group the flagged ones, write candidate task folders into ``out``.

    The inbox is read by :func:`lorax.serving.inputs.collect_inputs` (same rules as ``lorax predict``: skipped
    entries are error rows in ``predictions.csv``; symlinks leaving an inbox folder only with ``follow_links``).

    Returns the summary written to ``out/scan.json``.
    """
    if predictor.openset is None:
        raise ServingError(
            "the model has no open-set calibration, so nothing can be flagged; run `lorax calibrate STATE "
            "--manifests DIR` (or pass --manifests to scan)"
        )
    out = Path(out)
    paths = collect_inputs(inbox, follow_links=follow_links)
    _prepare_out(out, overwrite)
    pred = predictor.predict(paths, keep_features=True)
    table = pred.table
    write_csv(table, out / "predictions.csv")
    flagged = np.flatnonzero(table["unknown"].fillna(False).to_numpy(dtype=bool))  # the row's rule: fake + score
    n_ok = int((table["status"] == "ok").sum())
    summary: dict[str, Any] = {
        "inbox": [str(p) for p in inbox], "n_images": len(table), "n_ok": n_ok,
        "n_errors": int(len(table) - n_ok), "n_flagged": int(len(flagged)),
        "threshold": predictor.openset.threshold, "candidates": [], "ungrouped": [],
    }
    if len(flagged):
        z = predictor.openset.project(pred.features[flagged])
        labels, note = cluster(z, max_groups=max_groups, min_group=min_group)
        summary["clustering"] = note
        for g in range(int(labels.max()) + 1):
            rows = flagged[labels == g]
            members = [{
                "source": str(table.at[i, "path"]),
                "unknown_score": float(table.at[i, "unknown_score"]),
                "fake_probability": float(table.at[i, "fake_probability"]),
                "nearest_class": str(table.at[i, "top"][0]["class"]),
            } for i in rows]
            if len(rows) < min_group:
                summary["ungrouped"] += members
                continue
            name = f"candidate_{len(summary['candidates']) + 1:02d}"
            dest = out / name / "train" / "1_fake"
            dest.mkdir(parents=True)
            for j, m in enumerate(members):
                src = Path(m["source"])
                m["file"] = f"{name}/train/1_fake/{j:04d}_{src.name}"
                shutil.copy2(src, out / m["file"])
            (out / name / "README.md").write_text(_readme(name, members, predictor.openset.threshold))
            summary["candidates"].append({"name": name, "n_images": len(members),
                                          "mean_unknown_score": float(np.mean([m["unknown_score"] for m in members])),
                                          "members": members})
    write_json(out / SCAN_FILE, summary)
    log.info("scan: %d images, %d unreadable, %d flagged, %d candidate group(s) -> %s", len(table),
             summary["n_errors"], len(flagged), len(summary["candidates"]), out)
    return summary


def energy_score(logits: np.ndarray) -> np.ndarray:
    """The energy baseline's unknown score: minus the log-sum-exp of the logits (high = unlike every class)."""
    m = logits.max(1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(logits - m).sum(1)))


def msp_score(logits: np.ndarray) -> np.ndarray:
    """The max-softmax baseline's unknown score: minus the top class probability."""
    from lorax.continual.metrics import softmax

    return -softmax(logits).max(1)


def val_halves(df: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A task's val rows split in two, half of each class each (seeded): the open-set threshold's half and the
    known test half of a held-out evaluation."""
    import pandas as pd

    val = df[df["split"] == "val"]
    half = pd.concat([val[val["label"] == lab].sample(frac=0.5, random_state=seed) for lab in (0, 1)])
    return half, val.drop(half.index)


def evaluate_heldout(predictor: Predictor, known: dict[str, Any], unknown: dict[str, Any], out: str | Path,
                     seed: int = 0) -> dict[str, Any]:
    """Open-set evaluation with held-out generators (``docs/results.md``).

    ``known``: manifests of the model's tasks; ``unknown``: manifests of generators it never saw. The known val
    images are split in half per class: one half sets the threshold (with the train split for the class means),
    the other is the known test set. Per unknown generator: AUROC of the unknown score (and of the energy and
    max-softmax baselines) for its fakes against the known test set, the share of its fakes flagged, and a
    ``scan_inbox`` of known test + its fakes: how many of its fakes land in one candidate group, and that group's
    purity. Writes each scan under ``out/<generator>``.
    """
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from lorax.data.manifest import abs_paths
    from lorax.serving.openset import calibrate

    out = Path(out)
    cal_val, test_rows = {}, []
    for t in predictor.tasks:
        cal_val[t], rest = val_halves(known[t], seed)
        test_rows.append(rest)
    predictor.openset = calibrate(predictor, known, val=cal_val, seed=seed)
    test = pd.concat(test_rows)
    kp = predictor.predict([str(p) for p in abs_paths(test)], progress=False)

    def scores(res) -> dict[str, np.ndarray]:
        ok = (res.table["status"] == "ok").to_numpy()
        lg = res.logits[ok]
        return {"mahalanobis": res.table["unknown_score"].to_numpy(dtype=float)[ok],
                "energy": energy_score(lg), "msp": msp_score(lg),
                "fake_p": res.table["fake_probability"].to_numpy(dtype=float)[ok],
                "called_fake": (res.table["verdict"] == "fake").to_numpy(dtype=bool)[ok]}

    ks = scores(kp)
    thr = predictor.openset.threshold
    report: dict[str, Any] = {
        "tasks": list(predictor.tasks), "threshold": thr, "n_known_test": int(len(ks["mahalanobis"])),
        "known_flag_rate": float((ks["mahalanobis"] > thr).mean()),
        "known_flag_rate_require_fake": float(((ks["mahalanobis"] > thr) & ks["called_fake"]).mean()),
        "generators": {},
    }
    for g, df in unknown.items():
        fakes = df[df["label"].astype(int) == 1]
        reals = df[df["label"].astype(int) == 0]
        fp = predictor.predict([str(p) for p in abs_paths(fakes)], progress=False)
        rp = predictor.predict([str(p) for p in abs_paths(reals)], progress=False)
        us, ur = scores(fp), scores(rp)
        y = np.r_[np.zeros(len(ks["mahalanobis"])), np.ones(len(us["mahalanobis"]))]
        auroc = {k: float(roc_auc_score(y, np.r_[ks[k], us[k]])) for k in ("mahalanobis", "energy", "msp")}
        flagged = us["mahalanobis"] > thr
        inbox = out / f"{g}_inbox.txt"
        out.mkdir(parents=True, exist_ok=True)
        fake_paths = [str(p) for p in abs_paths(fakes)]
        inbox.write_text("\n".join([str(p) for p in abs_paths(test)] + fake_paths) + "\n")
        s = scan_inbox(predictor, [inbox], out / g, overwrite=True)
        fake_set = set(fake_paths)
        per_group = [(sum(m["source"] in fake_set for m in c["members"]), c["n_images"]) for c in s["candidates"]]
        best = max(per_group, default=(0, 0))
        report["generators"][g] = {
            "n_fakes": int(len(us["mahalanobis"])), "auroc": auroc,
            "fake_flag_rate": float(flagged.mean()),
            "fake_flag_rate_require_fake": float((flagged & us["called_fake"]).mean()),
            "fake_called_fake": float(us["called_fake"].mean()),
            "real_flag_rate": float((ur["mahalanobis"] > thr).mean()),
            "scan_flagged": s["n_flagged"], "scan_groups": len(s["candidates"]),
            "share_in_one_group": best[0] / max(1, len(fake_paths)),
            "purity_of_that_group": best[0] / best[1] if best[1] else 0.0,
        }
        log.info("held-out %s: %s", g, report["generators"][g])
    write_json(out / "heldout.json", report)
    return report
