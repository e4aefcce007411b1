"""Which frozen features attribute real images: a probe on the TRAIN split of ``../shared/data/realworld`` only.

    python -m benchmarks.realworld_levels [--data ../shared/data/realworld] [--out outputs/realworld_levels.json]

How ``model.feature_levels`` of ``params.realworld.yaml`` was chosen, without looking at the val split: the frozen
backbone of ``--params`` embeds every train image on 5 crops of 224 px (4 corners + centre, the 256 px image
covered), keeping per crop the layer-normed first (class) token and mean patch token after blocks 4, 8 and 12; a
logistic regression (standardised features, every crop a sample, probabilities averaged over the crops) is scored
by 4-fold cross-validation grouped by source (``group`` column: crops of one photo, prompts, BigGAN walks never
straddle folds), as pooled multi-real accuracy (a real image counted right as any task's real class, a fake only as
its own generator) and binary AP.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lorax.utils.io import write_json
from pipelines.cli.settings import add_settings_arguments

TASKS = ["biggan", "stylegan2", "ldif", "glid3", "dmin", "disco"]
LEVELS = (4, 8, 12)
CONFIGS = [  # (name, blocks, parts, crops, balanced)
    ("block 12, class token, centre crop", (12,), "cls", "centre", False),
    ("block 12, class + mean token, centre crop", (12,), "both", "centre", False),
    ("block 12, class + mean token, 5 crops", (12,), "both", "all", False),
    ("block 12, 5 crops, class-balanced", (12,), "both", "all", True),
    ("block 8, 5 crops", (8,), "both", "all", False),
    ("blocks 8 + 12, 5 crops", (8, 12), "both", "all", False),
    ("blocks 4 + 8 + 12, 5 crops", (4, 8, 12), "both", "all", False),
    ("blocks 4 + 8 + 12, 5 crops, class-balanced", (4, 8, 12), "both", "all", True),
]


def train_split_backbone(data: Path, params) -> tuple[object, object, np.ndarray, np.ndarray]:
    """The train rows of ``data``'s manifest.csv, the frozen backbone of ``params`` and its normalisation (mean, std
    shaped to broadcast over (3, H, W) crops in [0, 1])."""
    import pandas as pd

    from lorax.data.dataset import normalization
    from lorax.models.backbone_factory import create_backbone

    df = pd.read_csv(data / "manifest.csv")
    df = df[df["split"] == "train"].reset_index(drop=True)
    bb = create_backbone(params.model).eval()
    mean, std = normalization("auto", bb.info)
    return (df, bb, np.asarray(mean, dtype=np.float32)[:, None, None],
            np.asarray(std, dtype=np.float32)[:, None, None])


def extract(data: Path, params_path: str) -> tuple[np.ndarray, object]:
    """(N, 5 crops, 3 levels, 2D) features of the train split's images, and the manifest rows."""
    import torch
    from PIL import Image

    from lorax.config import load_params
    from lorax.data.dataset import crop_boxes

    params = load_params(params_path, {"model.feature_levels": list(LEVELS[:-1])})
    df, bb, m, s = train_split_backbone(data, params)
    crop = params.model.img_size
    out = []
    with torch.no_grad():
        for i, rel in enumerate(df["path"]):
            img = Image.open(data / rel).convert("RGB")
            boxes = crop_boxes(*img.size, crop, 5)
            x = np.stack([(np.asarray(img.crop(b), dtype=np.float32).transpose(2, 0, 1) / 255 - m) / s for b in boxes])
            levels: list[torch.Tensor] = []
            tokens = bb.run_blocks(bb.stem(torch.from_numpy(x)), levels=levels)
            last = bb.level_feature(tokens)
            out.append(torch.stack([*levels, last], 1).numpy())
            if i % 50 == 0:
                print(f"{i}/{len(df)} images", flush=True)
    return np.stack(out), df


def multi_real_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    from lorax.continual.metrics import multi_real_correct

    return float(multi_real_correct(pred, y).mean())


def cross_validate(F: np.ndarray, df, blocks: tuple[int, ...], parts: str, crops: str, balanced: bool,
                   folds: int = 4) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    d = F.shape[-1] // 2
    part = {"cls": slice(0, d), "both": slice(0, 2 * d)}[parts]
    use = [4] if crops == "centre" else [0, 1, 2, 3, 4]  # crop_boxes(n=5): corners, then the centre last
    X = F[:, :, [LEVELS.index(b) for b in blocks], part].reshape(len(F), 5, -1)[:, use]
    y = np.array([2 * TASKS.index(t) + int(lab) for t, lab in zip(df["task"], df["label"], strict=True)])
    groups = df["group"].fillna(df["path"]).astype(str).to_numpy()
    accs, aps = [], []
    for tr, te in GroupKFold(folds).split(X, y, groups):
        xa = X[tr].reshape(-1, X.shape[-1])
        sc = StandardScaler().fit(xa)
        clf = LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced" if balanced else None)
        clf.fit(sc.transform(xa), np.repeat(y[tr], len(use)))
        proba = np.mean([clf.predict_proba(sc.transform(X[te][:, c])) for c in range(len(use))], 0)
        accs.append(multi_real_accuracy(clf.classes_[proba.argmax(1)], y[te]))
        aps.append(average_precision_score(y[te] % 2, proba[:, clf.classes_ % 2 == 1].sum(1)))
    return float(np.mean(accs)), float(np.mean(aps))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/realworld")
    add_settings_arguments(ap, default="params.realworld.yaml", overrides=False)
    ap.add_argument("--out", default="outputs/realworld_levels.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    F, df = extract(Path(args.data), args.params)
    rows = []
    for name, blocks, parts, crops, balanced in CONFIGS:
        acc, ap_ = cross_validate(F, df, blocks, parts, crops, balanced)
        rows.append({"features": name, "pooled_acc": round(acc, 3), "binary_ap": round(ap_, 3)})
        print(f"{name:48s} pooled multi-real acc {acc:.3f}  binary AP {ap_:.3f}", flush=True)
    write_json(args.out, {"rows": rows, "images": len(df), "seconds": round(time.time() - t0)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
