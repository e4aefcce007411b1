"""A built-in "pretrained" backbone for machines with no model hub: pretext training on image-forensics cues.

LoRAX assumes a frozen *pretrained* backbone (ImageNet in the paper); its adapters only steer features that
exist. A randomly initialised frozen ViT has none worth steering: measured here, a linear probe and even LoRA
adapters on a random tiny ConViT stay at chance on the zoo (docs/results.md). With no network, the project
therefore builds its own pretrained backbone: the model is trained once to recognise which classical low-level
operation (resampling kernels, blur, noise, sharpening, JPEG) was applied to a real image. Those operations are
not the zoo's generators (no zoo decoder is used and the images come from a domain of their own), in the same
way that ImageNet is not CDDB: the backbone learns generic low-level features, the adapters learn generators.

The result is an ordinary checkpoint (safetensors + JSON sidecar) that ``model.pretrained: pretext`` loads like
any other (``lorax.models.backbone_factory``); it is cached by its settings, so it is built once per machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lorax.models.config import ModelConfig
from lorax.models.backbones import build_backbone
from lorax.models.weights.cache import weights_cache_dir
from lorax.utils.io import atomic_path, write_json

log = logging.getLogger(__name__)

PRETEXT = "pretext"  # the model.pretrained value that names this backbone
OPS = ("identity", "nearest", "bilinear", "bicubic", "box_blur", "noise", "sharpen", "jpeg")
PRETEXT_DOMAIN = "__pretext__"  # a real-image domain of its own, not any task's


def _resample(img: np.ndarray, mode: int, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = img.shape
    f = int(rng.choice([2, 3]))
    pil = Image.fromarray((img * 255).round().astype(np.uint8))
    small = pil.resize((max(1, w // f), max(1, h // f)), Image.BOX)
    return np.asarray(small.resize((w, h), mode), dtype=np.float64) / 255.0


def degrade(img: np.ndarray, op: str, rng: np.random.Generator) -> np.ndarray:
    """Apply pretext operation ``op`` to a float HxWx3 image in [0, 1]."""
    if op == "identity":
        return img
    if op == "nearest":
        return _resample(img, Image.NEAREST, rng)
    if op == "bilinear":
        return _resample(img, Image.BILINEAR, rng)
    if op == "bicubic":
        return _resample(img, Image.BICUBIC, rng)
    if op == "box_blur":
        k = np.ones(3) / 3
        out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, img)
        return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, out)
    if op == "noise":
        return np.clip(img + rng.normal(0, rng.uniform(0.02, 0.06), img.shape), 0, 1)
    if op == "sharpen":
        blur = degrade(img, "box_blur", rng)
        return np.clip(img + rng.uniform(0.5, 1.5) * (img - blur), 0, 1)
    if op == "jpeg":
        buf = io.BytesIO()
        Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(30, 80)))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float64) / 255.0
    raise ValueError(f"unknown pretext op {op!r}; allowed: {OPS}")


def pretext_dataset(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 NxHxWx3) of the pretext domain with balanced op labels."""
    from lorax.data.zoo_real import domain_for, rng_for, sample_real

    domain = domain_for(seed, PRETEXT_DOMAIN)
    rng = rng_for(seed, "pretext-images")
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % len(OPS)
    for i in tqdm(range(n), desc="pretext images", leave=False, disable=None):
        img = degrade(sample_real(rng, domain, size), OPS[labels[i]], rng)
        images[i] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return images, labels


def cache_key(cfg: ModelConfig, n_images: int, epochs: int, seed: int, lr: float = 2e-3, batch_size: int = 64) -> str:
    blob = json.dumps({"backbone": cfg.backbone, "img_size": cfg.img_size, "kwargs": cfg.kwargs,
                       "init_seed": cfg.init_seed, "n": n_images, "epochs": epochs, "seed": seed, "lr": lr,
                       "batch": batch_size, "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretext_checkpoint(cfg: ModelConfig) -> Path:
    """The pretext backbone for ``cfg`` (``model.pretrained: pretext``), built on first use and cached.

    The cache (``$LORAX_WEIGHTS_CACHE`` or ~/.cache/lorax/weights) is keyed by every setting the weights depend
    on, so each process, stage or flow finds the same file; a lock keeps concurrent builders from racing.
    """
    p = cfg.pretext
    key = cache_key(cfg, p.n_images, p.epochs, p.seed, p.lr, p.batch_size)
    out = weights_cache_dir() / f"pretext-{cfg.backbone}-{key}.safetensors"
    lock = out.with_suffix(".lock")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        import fcntl

        fcntl.flock(fh, fcntl.LOCK_EX)
        return pretrain_backbone(cfg, out, n_images=p.n_images, epochs=p.epochs, batch_size=p.batch_size,
                                 lr=p.lr, seed=p.seed)


def pretrain_backbone(cfg: ModelConfig, out: str | Path, n_images: int = 4000, epochs: int = 12,
                      batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> Path:
    """Train ``cfg``'s backbone on the pretext task and save its weights (no head) to ``out`` (safetensors).

    Reuses ``out`` when its sidecar records the same settings. Deterministic on CPU for fixed settings.
    """
    out = Path(out)
    sidecar = out.with_suffix(".json")
    key = cache_key(cfg, n_images, epochs, seed, lr, batch_size)
    if out.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("key") == key:
        log.info("pretext backbone: reusing %s", out)
        return out
    t0 = time.time()
    size = cfg.img_size + cfg.img_size // 2
    images, labels = pretext_dataset(n_images, size, seed)
    random_cfg = cfg.model_copy(update={"pretrained": None})
    bb = build_backbone(random_cfg)
    for p in bb.parameters():
        p.requires_grad_(True)
    head = torch.nn.Linear(bb.embed_dim, len(OPS))
    params = list(bb.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * (n_images // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(bb.info.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.info.std).view(1, 3, 1, 1)
    data = torch.from_numpy(images).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(labels)
    bb.train()
    c = cfg.img_size
    bar = tqdm(range(steps), desc="pretext pretraining", disable=None)
    acc = 0.0
    for step in bar:
        idx = torch.randint(0, n_images, (batch_size,), generator=g)
        oy, ox = (int(v) for v in torch.randint(0, size - c + 1, (2,), generator=g))
        x = data[idx, :, oy: oy + c, ox: ox + c].float().div(255)
        if torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(3)
        x = (x - mean) / std
        logits = head(bb(x))
        loss = F.cross_entropy(logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        acc = 0.95 * acc + 0.05 * (logits.argmax(1) == y_all[idx]).float().mean().item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    sd = {k: v.detach().contiguous() for k, v in bb.model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(sd, str(tmp))
    write_json(sidecar, {
        "key": key, "backbone": cfg.backbone, "mean": list(bb.info.mean), "std": list(bb.info.std), "img_size": cfg.img_size, "kwargs": cfg.kwargs, "ops": OPS,
        "n_images": n_images, "epochs": epochs, "seed": seed, "train_acc_ema": round(acc, 4),
        "seconds": round(time.time() - t0, 1),
        "what": "pretext pretraining on classical low-level operations (lorax.models.pretext); no zoo generator",
    })
    log.info("pretext backbone: %s (train acc ~%.2f, %.0f s)", out, acc, time.time() - t0)
    return out
