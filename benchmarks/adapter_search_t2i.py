"""Where must a LoRA adapter sit to add to the frozen super-feature? (issue 21, point 3; t2i train split only)

The profile's per-task adapters (the last 3 blocks' attention) tie the frozen probe on t2i. This search asks the
question before the stream: one adapter, trained on all seven generators at once (14 classes, the joint upper
bound of what per-task adapters at that place could learn), on prompt groups of two folds of t2i's train split;
scored on the third fold's prompts, which neither the adapter nor the head saw. Per configuration (blocks, layers,
rank, epochs): the pooled multi-real accuracy of a logistic head (the stream's refit: standardised, C from params)
on the frozen super-feature alone, on the adapter's feature alone, and on both concatenated — the last minus the
first is what the adapter adds.

Cost is kept to a frozen pass and a few minutes per configuration: the four corner crops of every train image run
once through the frozen backbone, which stores the tokens entering each searched start block (fp16, memory-mapped,
under ``--cache``) and the frozen super-feature; a configuration then runs only its adapted blocks. The adapter's
feature is the pooled output of its last block (the parameter-free level feature of :mod:`lorax.models.backbones`,
or the backbone's pooled embedding after the last block). Val is never read.

    python -m benchmarks.adapter_search_t2i --out outputs/adapter_search \
        --config last3-attn:9:12:attn:64:3 --config early4-attn:0:4:attn:64:3
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmarks.openset_t2i import PROTOCOL_T2I
from lorax.config import load_params
from lorax.continual.metrics import multi_real_correct
from pipelines.cli.settings import add_settings_arguments, parse_overrides

log = logging.getLogger("adapter_search")

TARGETS = {"attn": r".*\.attn\.(qk|v|qkv|proj|pos_proj)$", "mlp": r".*\.mlp\.(fc1|fc2)$",
           "both": r".*\.(attn\.(qk|v|qkv|proj|pos_proj)|mlp\.(fc1|fc2))$"}
CROPS = 4  # default: the eval view's four corner crops; each is a training sample, their mean the image's feature


@dataclass(frozen=True)
class SearchConfig:
    """One adapter placement: blocks ``start..end-1`` (0-based), which Linears, LoRA rank, epochs."""

    name: str
    start: int
    end: int
    where: str
    rank: int
    epochs: int

    @classmethod
    def parse(cls, text: str) -> SearchConfig:
        """``name:start:end:where:rank:epochs`` (e.g. ``early4:0:4:attn:64:3``)."""
        parts = text.split(":")
        if len(parts) != 6:
            raise argparse.ArgumentTypeError(f"--config {text!r}: expected name:start:end:where:rank:epochs")
        name, start, end, where, rank, epochs = parts
        if where not in TARGETS:
            raise argparse.ArgumentTypeError(f"--config {text!r}: where must be one of {sorted(TARGETS)}")
        cfg = cls(name, int(start), int(end), where, int(rank), int(epochs))
        if not 0 <= cfg.start < cfg.end:
            raise argparse.ArgumentTypeError(f"--config {text!r}: need 0 <= start < end")
        return cfg


def grouped_folds(groups: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index per row, whole groups (prompts: every generator's image of one prompt) to one fold."""
    uniq = np.unique(groups.astype(str))
    perm = np.random.default_rng(seed).permutation(uniq)
    fold_of = {g: i % n_folds for i, g in enumerate(perm)}
    return np.array([fold_of[g] for g in groups.astype(str)])


def train_rows(manifests: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every task's train-split rows, one table in stream order, with their prompt/photo groups."""
    from lorax.data.groups import row_groups

    rows = pd.concat([df[df["split"] == "train"] for df in manifests.values()], ignore_index=True)
    rows["group"] = row_groups(rows)
    return rows


class FrozenPass:
    """The frozen backbone's view of every crop, computed once: tokens entering each ``taps`` block (fp16
    memory-maps) and the frozen super-feature (spectrum, feature levels, pooled last block)."""

    def __init__(self, cache: Path, rows: pd.DataFrame, shapes: dict[int, tuple[int, int]], feat_dim: int,
                 crops: int = CROPS, img_size: int = 224) -> None:
        import hashlib

        n = len(rows)
        cache.mkdir(parents=True, exist_ok=True)
        self.cache, self.taps, self.crops = cache, sorted(shapes), crops
        self.done = cache / "done.json"
        images = hashlib.sha256("\n".join(rows["sha256"].astype(str)).encode()).hexdigest()[:16]
        self.key = {"rows": n, "images": images, "crops": crops, "img_size": img_size}
        stored = json.loads(self.done.read_text()) if self.done.is_file() else {}
        self.reuse = (all(stored.get(k) == v for k, v in self.key.items())
                      and set(self.taps) <= set(stored.get("taps", ())))
        self.key["taps"] = stored["taps"] if self.reuse else self.taps
        mode = "r+" if self.reuse else "w+"
        self.tokens = {t: np.lib.format.open_memmap(cache / f"tokens_{t}.npy", mode, np.float16, (n, crops, *shape))
                       for t, shape in shapes.items()}
        self.feats = np.lib.format.open_memmap(cache / "super.npy", mode, np.float32, (n, crops, feat_dim))

    def fill(self, bb, rows: pd.DataFrame, crop: int, batch: int, follow_links: bool) -> None:
        from lorax.data.dataset import ManifestDataset

        if self.reuse:
            log.info("frozen pass: reusing %s", self.cache)
            return
        self.done.unlink(missing_ok=True)
        k = self.crops
        ds = ManifestDataset(rows, False, crop, bb.info.mean, bb.info.std, n_crops=k, follow_links=follow_links)
        t0 = time.time()
        for lo in range(0, len(rows), batch):
            idx = range(lo, min(lo + batch, len(rows)))
            xs = [ds[i][0] for i in idx]
            x = torch.stack([a.reshape(k, *a.shape[-3:]) for a in xs]).flatten(0, 1)  # (b*k, C, H, W)
            with torch.inference_mode():
                levels = bb.pixel_features(x)
                h = bb.stem(x)
                for i in range(bb.depth):
                    if i in self.taps:
                        self.tokens[i][lo:lo + len(idx)] = h.view(len(idx), k, *h.shape[1:]).half().numpy()
                    h = bb.run_block(i, h)
                    if i in bb.levels:
                        levels.append(bb.level_feature(h))
                f = bb.features(h, levels)
            self.feats[lo:lo + len(idx)] = f.view(len(idx), k, -1).numpy()
            if lo // batch % 10 == 0:
                done = lo + len(idx)
                log.info("frozen pass %d/%d images, %.0f s (ETA %.0f s)", done, len(rows), time.time() - t0,
                         (time.time() - t0) / done * (len(rows) - done))
        for m in [*self.tokens.values(), self.feats]:
            m.flush()
        self.done.write_text(json.dumps({**self.key, "seconds": round(time.time() - t0, 1)}))


def token_shapes(bb, img_size: int, taps: list[int]) -> dict[int, tuple[int, int]]:
    """(tokens, width) entering each of ``taps`` (a ConViT gains its class token part-way)."""
    shapes = {}
    with torch.inference_mode():
        h = bb.stem(torch.zeros(1, 3, img_size, img_size))
        for i in range(bb.depth):
            if i in taps:
                shapes[i] = tuple(h.shape[1:])
            h = bb.run_block(i, h)
    return shapes


def adapted_feature(bb, h: torch.Tensor, end: int) -> torch.Tensor:
    """The adapter's feature after block ``end-1``: the backbone's pooled embedding after the last block, else
    the parameter-free level feature (class token and token mean)."""
    return bb.pool(h) if end == bb.depth else bb.level_feature(h)


def train_adapter(bb, cfg: SearchConfig, tokens: np.ndarray, y: np.ndarray, fit_idx: np.ndarray, n_classes: int,
                  lr: float, batch: int, alpha_ratio: float, seed: int) -> tuple[Any, dict[str, Any]]:
    """One LoRA adapter on blocks ``cfg.start..cfg.end-1`` + a linear head, cross-entropy over the 14 classes,
    every corner crop of the fitting rows a sample. Returns the adapter set (route named 'search') and info."""
    from lorax.config import AdapterConfig
    from lorax.models.adapters import LoraAdapterSet

    acfg = AdapterConfig(kind="lora", target_modules=TARGETS[cfg.where], r=cfg.rank, alpha=alpha_ratio * cfg.rank,
                         dropout=0.1, blocks="all")
    prefixes = [bb.block_prefix(i) for i in range(cfg.start, cfg.end)]
    adapters = LoraAdapterSet(bb.model, acfg, prefixes)
    torch.manual_seed(seed)
    adapters.add("search")
    adapters.set_trainable("search")
    dim = bb.embed_dim if cfg.end == bb.depth else 2 * bb.embed_dim
    head = torch.nn.Linear(dim, n_classes)
    params = adapters.parameters("search") + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-6)
    samples = np.array([(r, c) for r in fit_idx for c in range(tokens.shape[1])])
    steps = cfg.epochs * math.ceil(len(samples) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    t0, step, losses = time.time(), 0, []
    adapters.route.dropout = True
    with adapters.route.using("search"):
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(samples))
            for lo in range(0, len(order), batch):
                sel = samples[order[lo:lo + batch]]
                h = torch.from_numpy(np.stack([tokens[r, c] for r, c in sel]).astype(np.float32))
                h = bb.run_blocks(h, cfg.start, cfg.end)
                loss = torch.nn.functional.cross_entropy(head(adapted_feature(bb, h, cfg.end)),
                                                         torch.from_numpy(y[sel[:, 0]]).long())
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                step += 1
                losses.append(float(loss.detach()))
                if step % 50 == 0:
                    log.info("%s epoch %d step %d/%d loss %.3f, %.0f s (ETA %.0f s)", cfg.name, epoch + 1, step,
                             steps, np.mean(losses[-50:]), time.time() - t0, (time.time() - t0) / step * (steps - step))
    adapters.route.dropout = False
    adapters.set_trainable(None)
    info = {"train_seconds": round(time.time() - t0, 1), "steps": steps, "samples": len(samples),
            "final_loss": round(float(np.mean(losses[-50:])), 4), "adapter_params": adapters.n_params("search")}
    return adapters, info


def adapter_features(bb, adapters, cfg: SearchConfig, tokens: np.ndarray, batch: int) -> np.ndarray:
    """(N, feature) the adapter's feature of every row, the mean over its corner crops."""
    out = []
    with torch.inference_mode(), adapters.route.using("search"):
        for lo in range(0, tokens.shape[0], batch):
            h = torch.from_numpy(np.asarray(tokens[lo:lo + batch], dtype=np.float32))
            b = h.shape[0]
            f = adapted_feature(bb, bb.run_blocks(h.flatten(0, 1), cfg.start, cfg.end), cfg.end)
            out.append(f.view(b, tokens.shape[1], -1).mean(1).numpy())
    return np.concatenate(out)


def pooled_accuracy(x: np.ndarray, y: np.ndarray, fit: np.ndarray, test: np.ndarray, C: float) -> dict[str, float]:
    """The refit head (standardised logistic regression) fitted on ``fit`` rows, scored on ``test`` rows."""
    from lorax.continual.head import refit_head

    K = int(y.max()) + 1
    w, b = refit_head(torch.from_numpy(x[fit]).float(), torch.from_numpy(y[fit]), K, "refit", C)
    pred = (torch.from_numpy(x[test]).float() @ w.T + b).argmax(1).numpy()
    fake = y[test] % 2 == 1
    return {"pooled": round(100 * float(multi_real_correct(pred, y[test]).mean()), 2),
            "fake_attribution": round(100 * float((pred[fake] == y[test][fake]).mean()), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(ap, default="params.realworld.yaml")
    ap.add_argument("--data", default="../shared/data/t2i", help="t2i root (CDDB layout)")
    ap.add_argument("--tasks", nargs="+", default=PROTOCOL_T2I, help="tasks in stream order (default: t2i's seven)")
    ap.add_argument("--manifests", default=None, help="prepared manifests (default OUT/manifests; made when missing)")
    ap.add_argument("--out", default="outputs/adapter_search")
    ap.add_argument("--cache", default="cache/adapter_search", help="frozen tokens (a few GB; keyed by the images, "
                    "crops and size, rewritten when they differ; safe to delete)")
    ap.add_argument("--config", action="append", type=SearchConfig.parse, default=[],
                    help="name:start:end:where:rank:epochs (repeatable); where: attn | mlp | both")
    ap.add_argument("--crops", type=int, default=CROPS, help="crops per image, spread over it (4: the corners)")
    ap.add_argument("--frozen-only", action="store_true", help="score the frozen super-feature only (e.g. to "
                    "compare crop sizes with -S model.img_size=112: accuracy and frozen-pass time side by side)")
    ap.add_argument("--folds", type=int, default=3, help="grouped folds of the train split")
    ap.add_argument("--fold", type=int, default=0, help="the held-out fold")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="use the first N train rows of each task (0 = all; tests)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    configs = [] if args.frozen_only else args.config or [SearchConfig.parse("last3-attn:9:12:attn:64:3")]

    from lorax.data.manifest import load_stream_manifests, manifest_path
    from lorax.data.prepare import prepare_tasks
    from lorax.models.backbone_factory import create_backbone

    tasks = list(args.tasks)
    stream = {t: {"prev": "init" if i == 0 else tasks[i - 1]} for i, t in enumerate(tasks)}
    params = load_params(args.params, {"data.source": "folder", "data.root": args.data, "stream": stream,
                                       **parse_overrides(args.set)})
    mdir = Path(args.manifests or Path(args.out) / "manifests")
    if any(not manifest_path(mdir, t).is_file() for t in tasks):
        prepare_tasks(params.data.root, tasks, mdir, params.data, params.model.img_size)
    manifests = load_stream_manifests(mdir, tasks, params.data.root)
    if args.limit:
        manifests = {t: pd.concat([df[(df["split"] == "train") & (df["label"] == lab)].head(args.limit // 2)
                                   for lab in (0, 1)]) for t, df in manifests.items()}
    rows = train_rows(manifests)
    y = rows["class_id"].to_numpy(np.int64)
    folds = grouped_folds(rows["group"].to_numpy(), args.folds)
    fit, test = np.flatnonzero(folds != args.fold), np.flatnonzero(folds == args.fold)

    bb = create_backbone(params.model)
    bb.eval()
    taps = sorted({c.start for c in configs})
    bad = [c.name for c in configs if c.end > bb.depth]
    if bad:
        raise SystemExit(f"--config {bad}: end exceeds the backbone's {bb.depth} blocks")
    fp = FrozenPass(Path(args.cache), rows, token_shapes(bb, params.model.img_size, taps), bb.feature_dim,
                    args.crops, params.model.img_size)
    fp.fill(bb, rows, params.model.img_size, 8, params.data.follow_links)
    frozen = np.asarray(fp.feats).mean(1)
    C = params.continual.head_c
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"fold": args.fold, "folds": args.folds, "fit_rows": len(fit), "test_rows": len(test),
                               "head_c": C, "frozen": pooled_accuracy(frozen, y, fit, test, C), "configs": {},
                               "frozen_pass": json.loads(fp.done.read_text())}
    log.info("frozen super-feature: %s", results["frozen"])
    for n, cfg in enumerate(configs):
        if n:  # a clean backbone for each further placement (the adapters wrap the Linears of the one before)
            bb = create_backbone(params.model)
            bb.eval()
        adapters, info = train_adapter(bb, cfg, fp.tokens[cfg.start], y, fit, 2 * len(tasks), args.lr,
                                       args.batch, params.adapter.alpha / params.adapter.r, params.seed)
        t0 = time.time()
        feats = adapter_features(bb, adapters, cfg, fp.tokens[cfg.start], 8)
        info["feature_seconds"] = round(time.time() - t0, 1)
        np.save(out / f"{cfg.name}.features.npy", feats)  # per train row, for analyses without retraining
        res = {**asdict(cfg), **info, "adapter": pooled_accuracy(feats, y, fit, test, C),
               "frozen+adapter": pooled_accuracy(np.concatenate([frozen, feats], 1), y, fit, test, C)}
        res["gain"] = round(res["frozen+adapter"]["pooled"] - results["frozen"]["pooled"], 2)
        results["configs"][cfg.name] = res
        log.info("%s: %s", cfg.name, json.dumps(res))
        (out / f"fold{args.fold}.json").write_text(json.dumps(results, indent=2))  # each placement kept as it ends
    (out / f"fold{args.fold}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
