"""Open-set evaluation with held-out zoo generators: ``python -m benchmarks.openset_heldout``.

Trains a stream on some zoo generators (default ``deconv, nnconv, bilinconv``), then treats other generators
(default ``pixshuf, deconv3, bicubconv``) as unknown: :func:`lorax.serving.scan.evaluate_heldout` gives the AUROC
of the unknown score for their fakes against known validation images and how many of their fakes ``lorax scan``
puts into one candidate group. As a check of the score and the clustering apart from the model, the same is done
on log-amplitude spectra of the centre crops, a feature space where the zoo's generators are known to be
separable (docs/results.md, LoRAX section). A finished stream is reused on a re-run (delete ``OUT/NAME`` to
retrain it, e.g. after the zoo changed).

    python -m benchmarks.openset_heldout --out outputs/openset [--name NAME] [-S key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from lorax.config import add_settings_arguments, load_params, parse_overrides

KNOWN = ["deconv", "nnconv", "bilinconv"]
HELD = ["pixshuf", "deconv3", "bicubconv"]


def spectra(paths: list[str], crop: int) -> np.ndarray:
    """log(1 + |FFT|) of the grey centre crop: where upsampling leaves its periodic traces."""
    from lorax.data.dataset import crop_boxes
    from lorax.data.images import load_rgb, open_image

    out = []
    for p in paths:
        w, h = open_image(p).size
        a = load_rgb(p, box=crop_boxes(w, h, crop)[0]).astype(np.float64).mean(2)
        out.append(np.log1p(np.abs(np.fft.fft2(a - a.mean()))).ravel())
    return np.stack(out)


def spectral_check(known: dict, held: dict, crop: int, seed: int = 0) -> dict:
    """The open-set score and the scan's grouping on spectra instead of the model's super-features."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from lorax.data.manifest import abs_paths
    from lorax.serving.openset import fit, set_threshold
    from lorax.serving.scan import MIN_GROUP, cluster

    tr, ytr, cal, test = [], [], [], []
    for i, t in enumerate(known):
        df = known[t]
        train = df[df["split"] == "train"]
        tr.append(spectra([str(p) for p in abs_paths(train)], crop))
        ytr.append(2 * i + train["label"].to_numpy(dtype=int))
        val = df[df["split"] == "val"]
        half = pd.concat([val[val["label"] == lab].sample(frac=0.5, random_state=seed) for lab in (0, 1)])
        cal.append(spectra([str(p) for p in abs_paths(half)], crop))
        test.append(spectra([str(p) for p in abs_paths(val.drop(half.index))], crop))
    stats = set_threshold(fit(np.concatenate(tr), np.concatenate(ytr), 2 * len(known)), np.concatenate(cal))
    test_x = np.concatenate(test)
    s_known = stats.score(test_x)
    out = {"known_flag_rate": float((s_known > stats.threshold).mean()), "generators": {}}
    for g, df in held.items():
        fakes = df[df["label"].astype(int) == 1]
        fx = spectra([str(p) for p in abs_paths(fakes)], crop)
        s_u = stats.score(fx)
        y = np.r_[np.zeros(len(s_known)), np.ones(len(s_u))]
        inbox = np.concatenate([test_x, fx])
        is_unknown = np.r_[np.zeros(len(test_x), bool), np.ones(len(fx), bool)]
        flagged = np.flatnonzero(stats.score(inbox) > stats.threshold)
        best = (0, 0)
        if len(flagged):
            labels, _ = cluster(stats.project(inbox[flagged]))
            for k in range(labels.max() + 1):
                members = flagged[labels == k]
                if len(members) >= MIN_GROUP:
                    best = max(best, (int(is_unknown[members].sum()), len(members)))
        out["generators"][g] = {
            "auroc": float(roc_auc_score(y, np.r_[s_known, s_u])),
            "fake_flag_rate": float((s_u > stats.threshold).mean()),
            "share_in_one_group": best[0] / len(fx),
            "purity_of_that_group": best[0] / best[1] if best[1] else 0.0,
        }
    return out


def markdown(name: str, r: dict, spec: dict | None) -> str:
    lines = [f"### {name}: AAF of the known stream {r['aaf']:.1f}%, threshold {r['threshold']:.3f}, "
             f"known test images flagged {100 * r['known_flag_rate']:.1f}%", "",
             "| unknown generator | AUROC Mahalanobis | AUROC energy | AUROC max-softmax | fakes flagged | "
             "fakes in one candidate group | purity of that group | groups |",
             "|---|---|---|---|---|---|---|---|"]
    for g, m in r["generators"].items():
        a = m["auroc"]
        lines.append(f"| {g} | {a['mahalanobis']:.3f} | {a['energy']:.3f} | {a['msp']:.3f} | "
                     f"{100 * m['fake_flag_rate']:.1f}% | {100 * m['share_in_one_group']:.1f}% | "
                     f"{100 * m['purity_of_that_group']:.0f}% | {m['scan_groups']} |")
    if spec:
        lines += ["", f"Spectral check (same score and grouping on log-amplitude spectra; known test flagged "
                      f"{100 * spec['known_flag_rate']:.1f}%):", "",
                  "| unknown generator | AUROC | fakes flagged | fakes in one group | purity |", "|---|---|---|---|---|"]
        for g, m in spec["generators"].items():
            lines.append(f"| {g} | {m['auroc']:.3f} | {100 * m['fake_flag_rate']:.1f}% | "
                         f"{100 * m['share_in_one_group']:.1f}% | {100 * m['purity_of_that_group']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder: zoo/, manifests/, manifests_held/, NAME/ (stream)")
    ap.add_argument("--name", default="stream", help="sub-folder of the trained stream (reused when complete)")
    add_settings_arguments(ap)
    ap.add_argument("--known", nargs="+", default=KNOWN)
    ap.add_argument("--held", nargs="+", default=HELD)
    ap.add_argument("--no-spectral", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipelines.train_stream import run_stream
    from lorax.data.manifest import load_stream_manifests, read_manifest
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks
    from lorax.serving.predict import Predictor
    from lorax.serving.scan import evaluate_heldout

    out = Path(args.out)
    ov = {"data.root": str(out / "zoo"), "data.manifests": str(out / "manifests"),
          "stream": {t: {"prev": "init" if i == 0 else args.known[i - 1]} for i, t in enumerate(args.known)}}
    ov.update(parse_overrides(args.set))
    p = load_params(args.params, ov)
    t0 = time.time()
    synth_tasks(args.known + args.held, p.data.root, p.zoo)  # skipped when current; rebuilt when the zoo changed
    prepare_tasks(p.data.root, args.known, p.data.manifests, p.data, p.model.img_size)
    prepare_tasks(p.data.root, args.held, out / "manifests_held", p.data, p.model.img_size)
    metrics = run_stream(p, p.data.manifests, out / args.name)
    predictor = Predictor.from_state(out / args.name / "state" / args.known[-1], device=p.train.device, openset=None)
    known = load_stream_manifests(p.data.manifests, args.known)
    held = {g: read_manifest(out / "manifests_held" / f"{g}.parquet") for g in args.held}
    r = evaluate_heldout(predictor, known, held, out / args.name / "heldout", seed=p.seed)
    r.update(aaf=metrics["aaf"], settings=args.set, seconds=round(time.time() - t0, 1))
    spec = None if args.no_spectral else spectral_check(known, held, p.model.img_size, p.seed)
    r["spectral_check"] = spec
    (out / args.name / "heldout.json").write_text(json.dumps(r, indent=2))
    md = markdown(args.name, r, spec)
    (out / args.name / "heldout.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
