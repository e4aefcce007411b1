"""Does the residual spectrum (``model.spectrum``) add to the frozen tokens? TRAIN split of the real-world set only.

    python -m benchmarks.realworld_spectrum [--data ../shared/data/realworld] [--out outputs/realworld_spectrum.json]

How ``model.spectrum`` of ``params.realworld.yaml`` was chosen, without the val split. Every train image gives the
frozen embedding of ``--params`` (the backbone's own forward: the spectrum, then blocks 4 and 8's class and mean
tokens, then the pooled last block) of its 4 corner crops of 224 px, averaged (``eval.crops: 4``) -- what each of
LoRAX's adapters gives before training -- once as is and once under the resampling control (Lanczos 256 -> 240 px
before cropping, :func:`lorax.data.dataset.resample_array`). The refit head (:func:`lorax.continual.head.refit_head`,
the stream's code, C as ``continual.head_c`` at the last task, see :mod:`benchmarks.realworld_cv`) is fitted on the
as-is features of the training folds and scores the held-out fold as is and resampled: 4-fold CV grouped by source,
pooled multi-real accuracy and binary AP, at memory 500 (every train row) and 100 (8 rows per old class).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.realworld_cv import T, memory_subset
from benchmarks.realworld_levels import TASKS, multi_real_accuracy, train_split_backbone
from lorax.config import add_settings_arguments
from lorax.utils.io import write_json

CONTROL_SCALE = 0.9375  # 256 -> 240 px, eval.resample_control of the profile


def extract(data: Path, params_path: str) -> tuple[np.ndarray, np.ndarray, object, int]:
    """(N, D) as-is and resampled crop-mean embeddings of the train split, its rows, and the spectrum's width."""
    import torch
    from PIL import Image

    from lorax.config import load_params
    from lorax.data.dataset import crop_boxes, resample_array

    params = load_params(params_path)
    if params.model.spectrum is None:
        raise SystemExit(f"{params_path}: model.spectrum is off; this compares it with and without")
    df, bb, m, s = train_split_backbone(data, params)
    crop = params.model.img_size
    out: list[list[np.ndarray]] = [[], []]
    with torch.no_grad():
        for i, rel in enumerate(df["path"]):
            arr = np.asarray(Image.open(data / rel).convert("RGB"))
            for k, a in enumerate((arr, resample_array(arr, CONTROL_SCALE))):
                boxes = crop_boxes(a.shape[1], a.shape[0], crop, 4)
                x = np.stack([(a[t:b_, l:r].astype(np.float32).transpose(2, 0, 1) / 255 - m) / s
                              for l, t, r, b_ in boxes])
                out[k].append(bb(torch.from_numpy(x)).mean(0).numpy())
            if i % 50 == 0:
                print(f"{i}/{len(df)} images", flush=True)
    return np.stack(out[0]), np.stack(out[1]), df, bb.spectrum_dim


def cross_validate(X: np.ndarray, Xr: np.ndarray, y: np.ndarray, groups: np.ndarray, C: float,
                   memory: int | None, folds: int = 4) -> list[float]:
    """[pooled acc, AP, resampled pooled acc, resampled AP], means over the held-out folds."""
    import torch
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import GroupKFold

    from lorax.continual.head import refit_head

    res = []
    for k, (tr, te) in enumerate(GroupKFold(folds).split(X, y, groups)):
        if memory is not None:
            tr = memory_subset(tr, y, memory // (2 * T), seed=k)
        w, b = refit_head(torch.from_numpy(X[tr]), torch.from_numpy(y[tr]), 2 * T, "refit", C * T, 300)
        row = []
        for Z in (X, Xr):
            proba = torch.softmax((torch.from_numpy(Z[te]) @ w.T + b).double(), 1).numpy()
            row += [multi_real_accuracy(proba.argmax(1), y[te]), average_precision_score(y[te] % 2, proba[:, 1::2].sum(1))]
        res.append(row)
    return [float(v) for v in np.mean(res, 0)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/realworld")
    add_settings_arguments(ap, default="params.realworld.yaml", overrides=False)
    ap.add_argument("--out", default="outputs/realworld_spectrum.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    X, Xr, df, n_spec = extract(Path(args.data), args.params)
    y = np.array([2 * TASKS.index(t) + int(lab) for t, lab in zip(df["task"], df["label"], strict=True)])
    groups = df["group"].fillna(df["path"]).astype(str).to_numpy()
    parts = {"tokens (blocks 4 + 8 + last)": slice(n_spec, None), "spectrum": slice(0, n_spec),
             "tokens + spectrum (the profile)": slice(0, None)}
    rows = []
    for memory in (None, 100):
        for name, cols in parts.items():
            for C in (0.1, 1.0):
                acc, ap_, racc, rap = cross_validate(X[:, cols], Xr[:, cols], y, groups, C, memory)
                mem = "500 (all rows)" if memory is None else str(memory)
                rows.append({"features": name, "C": C, "memory": mem, "pooled_acc": round(acc, 3),
                             "binary_ap": round(ap_, 3), "resampled_pooled_acc": round(racc, 3),
                             "resampled_binary_ap": round(rap, 3)})
                print(f"memory {mem:15s} {name:32s} C={C:<4g} pooled {acc:.3f} AP {ap_:.3f} | resampled pooled "
                      f"{racc:.3f} AP {rap:.3f}", flush=True)
    write_json(args.out, {"rows": rows, "images": len(df), "seconds": round(time.time() - t0)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
