"""Knobs of the refit head (``continual.head``), chosen on the TRAIN split of ``../shared/data/realworld`` only.

    python -m benchmarks.realworld_cv [--features outputs/rw_train_feats.npy] [--out outputs/realworld_cv.json]

The proxy: the frozen backbone's embedding (the class and mean tokens after blocks 4, 8 and 12, as
``model.feature_levels: [4, 8]`` gives), averaged over the 4 corner crops of 224 px (``eval.crops: 4``), is what
every one of LoRAX's adapters gives before training (LoRA starts at zero), so the super-feature after the six tasks
is that embedding six times over; with an L2 penalty, six copies are the same as one copy at ``6 * C``, which is how
``C`` is reported (the value for ``continual.head_c`` at the last task). The head is fitted by
:func:`lorax.continual.head.refit_head` (the stream's own code) and scored by 4-fold cross-validation grouped by
source (``group``), as pooled multi-real accuracy and binary AP (as :mod:`benchmarks.realworld_levels`).

``memory 100``: the training folds keep 8 rows per class (100 // 12, seeded random) of the first five tasks and
every row of the last one, what the exemplar memory holds after the last task at ``continual.memory_size: 100``;
at 500 the memory holds every train row of this set (273 < 500).

``--run OUT/lorax-m500`` (a finished stream of :mod:`benchmarks.realworld`): the same CV on LoRAX's own
super-features of the train rows after the last task (6 adapters, ``eval.crops`` averaged), read from the run's
embedding store (no backbone pass; C as is, no copies). Optimistic: the adapters were trained on these rows, the
held-out folds included; it checks the choice of C on the features the head really sees, not the accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.realworld_levels import LEVELS, TASKS, extract, multi_real_accuracy
from lorax.utils.io import write_json
from pipelines.cli.settings import add_settings_arguments

T = len(TASKS)
GRID = [  # (name, kind, C at the last task, samples)
    ("refit C=0.001", "refit", 0.001, "mean"),
    ("refit C=0.01", "refit", 0.01, "mean"),
    ("refit C=0.1", "refit", 0.1, "mean"),
    ("refit C=1", "refit", 1.0, "mean"),
    ("refit C=10", "refit", 10.0, "mean"),
    ("ncm", "ncm", 1.0, "mean"),
    ("refit C=0.1, every crop a sample", "refit", 0.1, "crops"),
    ("refit C=1, every crop a sample", "refit", 1.0, "crops"),
]


def memory_subset(idx: np.ndarray, y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Training indices as the memory leaves them: ``per_class`` rows of each class of tasks 1..T-1, all of task T."""
    rng = np.random.default_rng(seed)
    keep = [idx[y[idx] >= 2 * (T - 1)]]
    for c in range(2 * (T - 1)):
        rows = idx[y[idx] == c]
        keep.append(rng.choice(rows, min(per_class, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def cross_validate(X: np.ndarray, y: np.ndarray, groups: np.ndarray, kind: str, C: float, samples: str,
                   memory: int | None, folds: int = 4) -> tuple[float, float]:
    """X: (N, 4 crops, D). Pooled multi-real accuracy and binary AP of the held-out folds (mean over folds)."""
    import torch
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import GroupKFold

    from lorax.continual.head import refit_head

    accs, aps = [], []
    for k, (tr, te) in enumerate(GroupKFold(folds).split(X, y, groups)):
        if memory is not None:
            tr = memory_subset(tr, y, memory // (2 * T), seed=k)
        if samples == "crops":
            xa, ya = X[tr].reshape(-1, X.shape[-1]), np.repeat(y[tr], X.shape[1])
        else:
            xa, ya = X[tr].mean(1), y[tr]
        # one copy at T * C == the T-adapter super-feature at C (see the module docstring)
        w, b = refit_head(torch.from_numpy(xa), torch.from_numpy(ya), 2 * T, kind, C * T, 300)
        logits = torch.from_numpy(X[te].mean(1)) @ w.T + b
        proba = torch.softmax(logits.double(), 1).numpy()
        accs.append(multi_real_accuracy(proba.argmax(1), y[te]))
        aps.append(average_precision_score(y[te] % 2, proba[:, 1::2].sum(1)))
    return float(np.mean(accs)), float(np.mean(aps))


def run_features(run: Path):
    """(N, 1, T * D) super-features of the train rows (stream order), labels, groups, from ``run``'s last state."""
    import pandas as pd

    from lorax.config import parse_params
    from lorax.continual.evaluation import predict_logits
    from lorax.continual.state import load_state, read_info
    from lorax.data.manifest import read_manifest
    from lorax.features import open_store

    info = read_info(run / "state" / TASKS[-1])
    tasks = info["tasks"]
    params = parse_params(info["params"], str(run))  # the run's own settings (they make the store keys)
    method, _ = load_state(run / "state" / tasks[-1], params=params)
    df = pd.concat([read_manifest(run.parent / "manifests" / f"{t}.parquet") for t in tasks], ignore_index=True)
    df = df[df["split"] == "train"].reset_index(drop=True)
    # the run's feature store holds these (its selection and head fits read them): read, not recomputed
    _, feats = predict_logits(method, df, params, features=True, desc="train super-features",
                              store=open_store(params.cache))
    cols = [feats]
    src = pd.read_csv(Path(df["root"].iloc[0]) / "manifest.csv").set_index("path")["group"]
    groups = df["path"].map(src).fillna(df["path"]).astype(str).to_numpy()
    X = np.concatenate(cols, 1).astype(np.float32)[:, None]
    return X, df["class_id"].to_numpy(), groups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/realworld")
    add_settings_arguments(ap, default="params.realworld.yaml", overrides=False)
    ap.add_argument("--features", default="outputs/rw_train_feats.npy",
                    help="cache of the frozen features (written when missing; rows beside it as .csv)")
    ap.add_argument("--out", default="outputs/realworld_cv.json")
    ap.add_argument("--run", help="a finished LoRAX run folder: CV on its super-features (see the docstring)")
    args = ap.parse_args(argv)
    import pandas as pd

    t0 = time.time()
    if args.run:
        X, y, groups = run_features(Path(args.run))
        rows = []
        for memory in (None, 100):
            for C in (0.01, 0.1, 1.0, 10.0):
                acc, ap_ = cross_validate(X, y, groups, "refit", C / T, "mean", memory)  # C / T: no copies
                mem = "500 (all rows)" if memory is None else str(memory)
                rows.append({"head": f"refit C={C:g}", "memory": mem, "pooled_acc": round(acc, 3),
                             "binary_ap": round(ap_, 3)})
                print(f"memory {mem:15s} super-features, refit C={C:<6g} pooled multi-real acc {acc:.3f}  "
                      f"binary AP {ap_:.3f}", flush=True)
        Path(args.out).write_text(json.dumps({"run": args.run, "rows": rows, "images": len(y),
                                              "seconds": round(time.time() - t0)}, indent=1) + "\n")
        return 0
    fpath = Path(args.features)
    if fpath.is_file():
        F, df = np.load(fpath), pd.read_csv(fpath.with_name(fpath.stem.replace("feats", "rows") + ".csv"))
    else:
        F, df = extract(Path(args.data), args.params)
        fpath.parent.mkdir(parents=True, exist_ok=True)
        np.save(fpath, F.astype(np.float32))
        df.to_csv(fpath.with_name(fpath.stem.replace("feats", "rows") + ".csv"), index=False)
    assert F.shape[2] == len(LEVELS)
    X = F[:, :4].reshape(len(F), 4, -1).astype(np.float32)  # crop_boxes(n=5): the 4 corners first, centre last
    y = np.array([2 * TASKS.index(t) + int(lab) for t, lab in zip(df["task"], df["label"], strict=True)])
    groups = df["group"].fillna(df["path"]).astype(str).to_numpy()
    rows = []
    for memory in (None, 100):
        for name, kind, C, samples in GRID:
            acc, ap_ = cross_validate(X, y, groups, kind, C, samples, memory)
            mem = "500 (all rows)" if memory is None else str(memory)
            rows.append({"head": name, "memory": mem, "pooled_acc": round(acc, 3), "binary_ap": round(ap_, 3)})
            print(f"memory {mem:15s} {name:40s} pooled multi-real acc {acc:.3f}  binary AP {ap_:.3f}", flush=True)
    write_json(args.out, {"rows": rows, "images": len(df), "seconds": round(time.time() - t0)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
