"""The detector's settings (``detect:`` in params.yaml), beside the detector they configure; assembled into
:class:`lorax.config.Params`. Each field's default is the one params.yaml states (tests/test_config.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lorax.models.config import ModelConfig
from lorax.settings_base import Section


class DetectConfig(Section):
    """The CLIP-MoLE binary (real/fake) detector (docs/design.md section 3, lorax/detect/)."""

    method: Literal["mole", "probe", "shared", "separate"] = Field(
        "mole", description="mole (shared LoRA + routed LoRA experts, CLIP-MoLE) | probe (linear probe on frozen "
        "features) | shared (the shared LoRA only) | separate (the routed experts only)")
    train_tasks: list[str] = Field(default_factory=lambda: ["deconv"], min_length=1,
                                   description="generators whose train split trains the detector (and whose val "
                                   "split sets its threshold); every other task tests it")
    blocks: int = Field(3, ge=0, description="adapt the last k blocks (0: all)")
    where: Literal["mlp", "attn", "both"] = Field("mlp", description="which layers of those blocks are adapted")
    shared_rank: int = Field(8, ge=0, description="rank of the always-on shared LoRA")
    expert_ranks: list[int] = Field(default_factory=lambda: [4, 8, 16], description="ranks of the routed experts")
    balance_weight: float = Field(0.01, ge=0, description="weight of the router's load-balancing loss")
    lr: float = Field(6e-4, gt=0, description="learning rate")
    epochs: int = Field(4, ge=1, description="training epochs")
    batch_size: int = Field(32, ge=1, description="training batch size")
    aug_prob: float = Field(0.1, ge=0, le=1, description="probability of a blur, and of a JPEG, per training image")
    blur_sigmas: list[float] = Field(default_factory=lambda: [1, 2, 3, 4], description="Gaussian blur sigmas drawn "
                                     "from (px)")
    jpeg_qualities: list[int] = Field(default_factory=lambda: [90, 70, 50, 30], description="JPEG qualities drawn "
                                      "from")
    scale_factors: list[float] = Field(default_factory=list, description="robustness: down-and-up scaling factors "
                                       "in (0, 1] (downscaled, then scaled back to the crop size)")
    aug_scale_prob: float = Field(0.0, ge=0, le=1, description="with views >= 1: probability of a down-and-up "
                                  "scaling (factor ~ U[0.5, 1]) per training view")
    views: int = Field(0, ge=0, description="0: a fresh random crop, flip and blur/JPEG of every training image "
                       "each epoch; k >= 1: k fixed augmented views (random crop, flip, blur/JPEG/scale) per training "
                       "image, the frozen blocks below the adapted ones run once per view and kept in the feature "
                       "store (cache:; lorax/detect/fixed_views.py)")
    eval_crops: int = Field(1, ge=1, description="with views >= 1: evaluation crops per image (1: centre; 4: the "
                            "corners), logits averaged")
    probe_c: float = Field(1.0, gt=0, description="with views >= 1: inverse L2 strength of the logistic regression "
                           "that is the probe and the head's start for every method")
    weight_decay: float = Field(0.01, ge=0, description="with views >= 1: AdamW weight decay (cosine lr decay)")
    head_lr_scale: float = Field(1.0, ge=0, description="with views >= 1: the head's lr is detect.lr times this")
    head_init: Literal["probe", "zero"] = Field("probe", description="with views >= 1: the head of an adapted "
                                                "method starts as the probe's logistic regression (probe) or at "
                                                "zero (zero: the paper's start; the adapters then learn from the "
                                                "first step)")
    model: ModelConfig | None = Field(None, description="the detector's own backbone, a full model section (null: "
                                      "the model section)")
    registered_model: str = Field("lorax-detector", min_length=1, description="registered model name of the "
                                  "detector's versions in the MLflow registry (models:/NAME@champion), apart from "
                                  "tracking.registered_model (the attributor)")
    register_min_ap: float = Field(90.0, ge=0, le=100, description="the detector's champion gate: a registered "
                                   "version becomes champion only when its mean AP (percent) on the val split of its "
                                   "training generators (metrics.json 'seen') is at least this")
