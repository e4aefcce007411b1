"""Reading and loading checkpoints safely: tensors only, never unpickled code; strict loading into a model.

``read_state_dict`` reads safetensors as such and anything else through ``torch.load(weights_only=True)``, which
refuses pickled objects; it unwraps ``state_dict``/``model``/``module.`` nesting. ``load_backbone_weights`` loads
strictly (only the classifier head may differ; position embeddings of another grid are resampled; foreign timm
layouts go through timm's checkpoint filter). ``inspect_checkpoint`` summarises a file for ``lorax weights inspect``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Nesting that training scripts wrap state dicts in (checked in this order).
NESTING_KEYS = ("state_dict", "model", "module", "model_state_dict", "model_state")
STRIP_PREFIXES = ("module.", "_orig_mod.")


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
