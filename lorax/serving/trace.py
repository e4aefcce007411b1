"""Serving the trace methods (``trace``, ``lorax+trace``; :mod:`lorax.continual.trace_methods`): each image's
super-feature built as the evaluation builds it (:func:`lorax.continual.evaluation._trace_logits`), with no feature
store.

The image is decoded once at native resolution by the serving loader (:meth:`lorax.serving.predict.Predictor.load`)
and the evaluation's fixed grid of ``trace.patches`` boxes of ``trace.patch`` px is cut from it
(:func:`lorax.data.patches.grid_boxes`, :func:`~lorax.data.patches.patch_tensor`: never resized, an image smaller
than a patch mirror-padded at its bottom / right; the shortcut controls are an evaluation matter, not serving's).
Every task's expert reads the same patches, one batch of images at a time: (B, T, dim). For ``lorax+trace`` each
task's adapter embedding of the usual ``eval.crops`` crops, averaged over the crops, goes before its expert's
([adapter, trace] per task). The per-task slices in task order are the super-feature (verdict, open-set score) and
what the head reads, computed in float32 after the (optional) autocast of the embeddings, as in evaluation.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorax.data.patches import grid_boxes, patch_tensor


@dataclass
class TraceItem:
    """One image as a trace method reads it: its patch grid (P, 3, p, p) uint8 and, for ``lorax+trace``, its
    normalised crops (crops, 3, H, W)."""

    patches: torch.Tensor
    crops: torch.Tensor | None = None

    def __len__(self) -> int:
        """What the image weighs in a batch (``Predictor.batch_size`` counts patches and crops)."""
        return len(self.patches) + (0 if self.crops is None else len(self.crops))


def grid_patches(img: np.ndarray, patch: int, patches: int) -> torch.Tensor:
    """(patches, 3, patch, patch) uint8: the evaluation's grid of the HxWx3 decoded image."""
    h, w = img.shape[:2]
    return patch_tensor(img, grid_boxes(w, h, patch, patches))


def trace_settings(params: dict[str, Any]) -> tuple[int, int]:
    """(patch, patches) of a state's ``trace:`` settings (the params of its ``state.json``)."""
    return int(params["trace"]["patch"]), int(params["trace"]["patches"])


@torch.no_grad()
def trace_logits_and_features(method: Any, items: list[TraceItem], device: torch.device,
                              amp: AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, classes) logits and (B, T * slice) super-features of ``items`` (float32, on the CPU)."""
    patches = torch.stack([it.patches for it in items]).to(device)
    with amp:
        emb = torch.stack([e(patches).float() for e in method.experts.list], 1)  # (B, T, dim)
    if method.frozen_task_adapters:  # lorax+trace: every adapter's embedding of the crops, their mean per image
        crops = torch.cat([it.crops for it in items]).to(device)
        with amp:
            ada = method.net.embeddings(crops).float().permute(1, 0, 2)  # (B * crops, T, adapter dim)
        ada = torch.stack([c.mean(0) for c in torch.split(ada, [len(it.crops) for it in items])])
        emb = torch.cat([ada, emb], -1)
        logits = method.net.classify(emb.permute(1, 0, 2))[0]
    else:
        logits = method.classify(emb)[0]
    return logits.float().cpu(), emb.flatten(1).cpu()
