"""Binary real/fake detectors on a frozen backbone: CLIP-MoLE and its baselines, by name in ``DETECTORS``.

Every method is backbone (+ optional low-rank adapters in some blocks) -> pooled embedding -> one linear layer; the
sigmoid of its logit is the probability that the image is fake. Methods (``detect.method``):

* ``mole``: shared LoRA + routed separate LoRA experts (CLIP-MoLE, :mod:`lorax.models.mole`);
* ``probe``: no adapters, linear probe on frozen features (UnivFD);
* ``shared``: the shared LoRA only (``detect.shared_rank``), i.e. a plain LoRA;
* ``separate``: the routed experts only (``detect.expert_ranks``).

``detect.blocks`` (last k, 0 = all) and ``detect.where`` (mlp | attn | both) choose the adapted linears. A detector
is saved as one safetensors file holding only what was trained (adapters, routers, head) plus, in its metadata, the
settings needed to rebuild the frozen backbone and the fitted threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lorax.detect.config import DetectConfig
from lorax.models.backbone_factory import create_backbone
from lorax.models.backbones import Backbone
from lorax.models.config import ModelConfig
from lorax.models.mole import MoLELinear, apply_mole, balance_loss, mole_state_dict
from lorax.registry import DETECTORS
from lorax.utils.io import atomic_path

__all__ = ["Detector", "build_detector", "load_detector", "save_detector"]

FORMAT = "lorax-detector/1"


class Detector(nn.Module):
    """Frozen backbone with (optional) MoLE layers inside, plus a linear head; ``forward`` returns logits (B,)."""

    def __init__(self, backbone: Backbone, layers: dict[str, MoLELinear], method: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, 1)
        self.method = method
        self.mole: dict[str, MoLELinear] = dict(layers)  # plain dict: the layers are registered inside the backbone
        # the head reads standardised features (training-set statistics; identity until set)
        self.register_buffer("feat_mean", torch.zeros(backbone.feature_dim))
        self.register_buffer("feat_std", torch.ones(backbone.feature_dim))

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise the features the head reads: ``(f - mean) / std``."""
        with torch.no_grad():
            self.feat_mean.copy_(mean)
            self.feat_std.copy_(std)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, feature_dim) -> logits (B,)."""
        return self.head((features - self.feat_mean.to(features.dtype)) / self.feat_std.to(features.dtype)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone(x))

    def balance_loss(self) -> torch.Tensor:
        """Sum of the MoLE layers' load-balancing losses of the last forward (0 without experts)."""
        if not self.mole:
            return self.head.weight.new_zeros(())
        return balance_loss(self.mole)

    def train(self, mode: bool = True) -> Detector:
        """The backbone stays in eval mode (frozen, no dropout / drop-path); adapters and head follow ``mode``."""
        super().train(mode)
        self.backbone.eval()
        for layer in self.mole.values():
            layer.train(mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """``head.*`` and ``mole.<layer>.<tensor>``: everything training changed, nothing frozen."""
        sd = {f"head.{k}": v.detach() for k, v in self.head.state_dict().items()}
        sd.update({"norm.mean": self.feat_mean.detach(), "norm.std": self.feat_std.detach()})
        sd.update({f"mole.{k}": v for k, v in mole_state_dict(self.backbone.model).items()})
        return sd

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
        own = self.trainable_state_dict()
        if "norm.mean" not in sd and "norm.std" not in sd:  # saved before the head read standardised features
            sd = {**sd, "norm.mean": torch.zeros_like(self.feat_mean), "norm.std": torch.ones_like(self.feat_std)}
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"{source}: does not fit this detector (missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}); it was saved with other detect/model settings")
        params = {**{f"head.{k}": p for k, p in self.head.named_parameters()},
                  "norm.mean": self.feat_mean, "norm.std": self.feat_std,
                  **{f"mole.{n}.{k}": p for n, layer in self.mole.items()
                     for k, p in layer.named_parameters() if not k.startswith("base.")}}
        with torch.no_grad():
            for k, p in params.items():
                if p.shape != sd[k].shape:
                    raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(p.shape)}")
                p.copy_(sd[k])


def _check_ranks(cfg: DetectConfig, method: str, shared: bool, experts: bool) -> None:
    if shared and cfg.shared_rank < 1:
        raise ValueError(f"detect.shared_rank: method {method!r} needs a shared LoRA rank >= 1 (got 0); "
                         "use method 'separate' for experts only")
    if experts and not cfg.expert_ranks:
        raise ValueError(f"detect.expert_ranks: method {method!r} needs at least one expert rank; "
                         "use method 'shared' for a shared LoRA only")


@DETECTORS.register("mole")
def _mole(backbone: Backbone, cfg: DetectConfig) -> Detector:
    _check_ranks(cfg, "mole", shared=True, experts=True)
    return Detector(backbone, apply_mole(backbone, cfg.blocks, cfg.where, cfg.shared_rank, cfg.expert_ranks), "mole")


@DETECTORS.register("shared")
def _shared(backbone: Backbone, cfg: DetectConfig) -> Detector:
    _check_ranks(cfg, "shared", shared=True, experts=False)
    return Detector(backbone, apply_mole(backbone, cfg.blocks, cfg.where, cfg.shared_rank, []), "shared")


@DETECTORS.register("separate")
def _separate(backbone: Backbone, cfg: DetectConfig) -> Detector:
    _check_ranks(cfg, "separate", shared=False, experts=True)
    return Detector(backbone, apply_mole(backbone, cfg.blocks, cfg.where, 0, cfg.expert_ranks), "separate")


@DETECTORS.register("probe")
def _probe(backbone: Backbone, cfg: DetectConfig) -> Detector:
    return Detector(backbone, {}, "probe")


def build_detector(model_cfg: ModelConfig, detect_cfg: DetectConfig, method: str | None = None,
                   seed: int = 0) -> Detector:
    """A fresh detector: backbone from ``model_cfg``, adapters of ``method`` (default ``detect_cfg.method``).

    The adapters and the head are initialised under ``seed``, so the same settings give the same starting point.
    """
    method = method or detect_cfg.method
    if method not in DETECTORS:
        raise ValueError(f"detect.method: unknown detector {method!r}; allowed: {DETECTORS.names()}")
    backbone = create_backbone(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DETECTORS.get(method)(backbone, detect_cfg)


def save_detector(det: Detector, path: str | Path, model_cfg: ModelConfig, detect_cfg: DetectConfig,
                  threshold: float, extra: dict[str, Any] | None = None) -> Path:
    """Write the trained tensors and the settings to rebuild the rest (safetensors metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "method": det.method,
        "model": model_cfg.model_dump_json(),
        "detect": detect_cfg.model_dump_json(),
        "threshold": repr(float(threshold)),
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in det.trainable_state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[Detector, float, dict[str, Any]]:
    """Rebuild a saved detector: ``(detector in eval mode, threshold, metadata)``.

    The frozen backbone is rebuilt from the stored ``model`` settings (same weights file or same random-init seed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: detector checkpoint not found; train one with `lorax detect`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a lorax detector checkpoint (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    model_cfg = ModelConfig.model_validate_json(meta["model"])
    detect_cfg = DetectConfig.model_validate_json(meta["detect"])
    det = build_detector(model_cfg, detect_cfg, meta["method"])
    det.load_trainable_state_dict(sd, source=str(path))
    det.to(device).eval()
    info = {"method": meta["method"], "model": model_cfg, "detect": detect_cfg, "extra": json.loads(meta["extra"])}
    return det, float(meta["threshold"]), info
