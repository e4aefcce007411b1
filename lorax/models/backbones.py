"""Frozen backbones behind one staged interface: ``stem -> blocks[i] -> pool``.

LoRAX needs the pooled embedding of an image; the performance work needs the trunk split by block (compute the
blocks before the first adapted one once, branch after), and CLIP-MoLE needs the block list to adapt the last k.
timm ViTs, timm ConViTs (whose class token joins after the local GPSA blocks) and open_clip's CLIP visual tower
differ in exactly those places, so each gets a small :class:`Backbone` subclass. ``build_backbone`` makes one from
a local checkpoint (or none); turning ``model.pretrained`` into that file is ``lorax.models.backbone_factory``'s job.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorax.models.config import ModelConfig
from lorax.models.spectrum import ResidualSpectrum
from lorax.models.weights.load import extract_open_clip_visual, load_backbone_weights, read_state_dict

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    embed_dim: int
    depth: int
    pretrained: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Backbone(nn.Module):
    """A frozen feature extractor split into stages. Subclasses wrap one model family."""

    info: BackboneInfo

    def __init__(self, model: nn.Module, info: BackboneInfo) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self.levels: tuple[int, ...] = ()  # 0-based blocks whose tokens join the features (model.feature_levels)
        self.spectrum: ResidualSpectrum | None = None  # model.spectrum: a pixel feature before the level features

    @property
    def embed_dim(self) -> int:
        """Width of the tokens and of the pooled embedding."""
        return self.info.embed_dim

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`forward`'s features: the spectrum, 2 x embed_dim per feature level, the pooled embedding."""
        return self.info.embed_dim * (1 + 2 * len(self.levels)) + self.spectrum_dim

    @property
    def spectrum_dim(self) -> int:
        return self.spectrum.dim if self.spectrum is not None else 0

    def set_spectrum(self, grid: int | None, sigma: float = 1.0) -> None:
        """``model.spectrum``: the residual spectrum of the crop (in the backbone's normalisation) joins the
        features; ``None`` = off."""
        self.spectrum = None if grid is None else ResidualSpectrum(self.info.mean, self.info.std, grid, sigma)

    def pixel_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features computed from the crop itself (the spectrum), first in :meth:`features`' order."""
        return [self.spectrum(x).to(x.dtype)] if self.spectrum is not None else []

    def set_levels(self, blocks: list[int]) -> None:
        """``model.feature_levels`` (1-based block numbers) -> the blocks whose tokens :meth:`run_blocks` collects."""
        bad = [b for b in blocks if b > self.depth]
        if bad:
            raise ValueError(f"model.feature_levels: blocks {bad} exceed the backbone's {self.depth} blocks")
        self.levels = tuple(sorted(b - 1 for b in blocks))

    @staticmethod
    def level_feature(x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens -> (B, 2D): first (class) token and mean of the others, after a parameter-free layer
        norm (intermediate tokens are not normed by the model, and their scale varies by block)."""
        x = torch.nn.functional.layer_norm(x, x.shape[-1:])
        return torch.cat([x[:, 0], x[:, 1:].mean(1)], -1)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        raise NotImplementedError

    def block_prefix(self, i: int) -> str:
        """Module-name prefix of block ``i`` inside ``self.model`` (for adapter target filtering)."""
        raise NotImplementedError

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> tokens entering block 0."""
        raise NotImplementedError

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> pooled embedding (B, embed_dim)."""
        raise NotImplementedError

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None,
                   levels: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Blocks ``start..end-1``; the level features of feature-level blocks among them go to ``levels``."""
        for i in range(start, self.depth if end is None else end):
            x = self.run_block(i, x)
            if levels is not None and i in self.levels:
                levels.append(self.level_feature(x))
        return x

    def features(self, tokens: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        """Pixel features, level features (block order) and the pooled last tokens, concatenated: (B, feature_dim)."""
        return torch.cat([*levels, self.pool(tokens)], -1) if levels else self.pool(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.pixel_features(x)
        return self.features(self.run_blocks(self.stem(x), levels=levels), levels)


class TimmViT(Backbone):
    """timm ``VisionTransformer`` (and relatives with ``patch_embed/_pos_embed/blocks/forward_head``)."""

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def block_prefix(self, i: int) -> str:
        return f"blocks.{i}."

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(x), pre_logits=True)


class TimmConViT(TimmViT):
    """timm ConViT: its own stem, and the class token is concatenated before block ``local_up_to_layer``."""

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        if m.use_pos_embed:
            x = x + m.pos_embed
        return m.pos_drop(x)

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if i == m.local_up_to_layer and m.cls_token is not None:
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return m.blocks[i](x)


class OpenClipVisual(Backbone):
    """open_clip ``VisionTransformer`` (the CLIP image tower); embedding = projected pooled token."""

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def block_prefix(self, i: int) -> str:
        return f"transformer.resblocks.{i}."

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.model._embeds(x)  # (B, L, D), ln_pre applied

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.model.transformer.batch_first:
            return self.blocks[i](x)
        return self.blocks[i](x.transpose(0, 1)).transpose(0, 1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.model._pool(x)
        if self.model.proj is not None:
            pooled = pooled @ self.model.proj
        return pooled


def _sidecar_normalization(checkpoint: Path | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """mean/std recorded next to a checkpoint (``<file>.json``) by the converters and the pretext trainer."""
    if checkpoint is None:
        return None
    side = checkpoint.with_suffix(".json")
    if side.is_file():
        meta = json.loads(side.read_text())
        if "mean" in meta and "std" in meta:
            return tuple(meta["mean"]), tuple(meta["std"])
    return None


def _normalization(cfg: ModelConfig, family: str, checkpoint: Path | None = None
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    name = cfg.normalize
    if name == "auto":
        recorded = _sidecar_normalization(checkpoint)
        if recorded is not None:
            return recorded
        if family == "clip":
            name = "clip"
        elif cfg.pretrained is None:
            name = "half"  # upstream LoRAX normalises with mean=std=0.5
        else:
            name = "imagenet"  # timm's ImageNet-pretrained ConViT / ViT weights
    return {
        "half": (HALF, HALF),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    }[name]


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def build_backbone(cfg: ModelConfig, checkpoint: Path | None = None) -> Backbone:
    """Build the frozen backbone named in ``cfg`` (head removed) with the weights of the local file ``checkpoint``.

    ``lorax.models.backbone_factory.create_backbone`` turns ``model.pretrained`` into that file. Without one the
    backbone is randomly initialised, seeded by ``cfg.init_seed`` so every process builds the same backbone, and
    that is announced loudly: features of a random backbone are far weaker than pretrained ones.
    """
    name = cfg.backbone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        if name.startswith("open_clip:"):
            model, family = _create_open_clip(name.split(":", 1)[1], cfg), "clip"
        else:
            model, family = _create_timm(name, cfg), ("convit" if name.startswith("convit") else "vit")
    if checkpoint is not None:
        sd = read_state_dict(checkpoint)
        if family == "clip":
            sd = extract_open_clip_visual(sd)
        load_backbone_weights(model, sd, source=str(checkpoint))
        log.info("backbone %s: loaded weights from %s", name, checkpoint)
    else:
        log.warning(
            "backbone %s: NO PRETRAINED WEIGHTS (model.pretrained is null) - randomly initialised with seed %d; "
            "features are much weaker than a pretrained backbone's",
            name,
            cfg.init_seed,
        )
    mean, std = _normalization(cfg, family, checkpoint)
    cls = {"clip": OpenClipVisual, "convit": TimmConViT, "vit": TimmViT}[family]
    if family == "clip":
        embed_dim = model.output_dim if model.proj is not None else model.transformer.width
    else:
        embed_dim = model.num_features
    info = BackboneInfo(name, embed_dim, 0, checkpoint is not None, mean, std)
    bb = cls(model, info)
    bb.info = BackboneInfo(name, embed_dim, bb.depth, checkpoint is not None, mean, std)
    bb.set_levels(list(cfg.feature_levels))
    if cfg.spectrum is not None:
        bb.set_spectrum(cfg.spectrum.grid, cfg.spectrum.sigma)
    _freeze(bb)
    return bb


def _create_timm(name: str, cfg: ModelConfig) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"model.backbone: {name!r} is not a timm model; e.g. convit_tiny, convit_base, vit_small_patch16_224")
    kwargs = dict(cfg.kwargs)
    kwargs.setdefault("img_size", cfg.img_size)
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise ValueError(f"model.kwargs: {kwargs} not accepted by timm model {name!r}: {e}") from None


def _create_open_clip(name: str, cfg: ModelConfig) -> nn.Module:
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"model.backbone: open_clip:{name} unknown; e.g. open_clip:ViT-B-32, open_clip:ViT-B-16, open_clip:ViT-L-14")
    model_cfg = open_clip.get_model_config(name)
    vision_cfg = dict(model_cfg["vision_cfg"])
    vision_cfg["image_size"] = cfg.img_size
    vision_cfg.update(cfg.kwargs)
    embed_dim = model_cfg["embed_dim"]
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
