"""Exemplar selection after a task: the memory's old classes shrunk to the new budget, the task's classes chosen
from their features (herding by default)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from lorax.config import Params
from lorax.features.store import FeatureStore
from lorax.continual.evaluation import predict_logits
from lorax.continual.memory import ExemplarMemory, per_class_budget
from lorax.continual.methods import Method
from lorax.utils.progress import timed

log = logging.getLogger(__name__)


def select_exemplars(method: Method, task_manifest: pd.DataFrame, memory: ExemplarMemory | None,
                     params: Params, device: torch.device | None = None,
                     store: FeatureStore | None = None) -> ExemplarMemory:
    """Memory after this task: old classes shrunk to the new per-class budget, new classes selected.

    Selection uses eval transforms (no augmentation) on all of the task's train rows at once, so it is
    deterministic and global: the same in every process.
    """
    memory = ExemplarMemory(memory.rows()) if memory is not None else ExemplarMemory()
    n_classes = method.n_classes
    c = params.continual
    budget = per_class_budget(c.memory_size, n_classes, c.memory_mode, c.memory_per_class)
    memory.shrink(budget)
    if budget == 0:
        return memory
    rows = task_manifest[task_manifest["split"] == "train"].reset_index(drop=True)
    feats = None
    if c.selection != "random":
        _, feats = predict_logits(method, rows, params, device, features=True, desc="exemplars", store=store)
    else:
        feats = np.zeros((len(rows), 1), dtype=np.float32)
    with timed(log, f"exemplar selection ({c.selection}): {budget} per class from {len(rows)} rows"):
        memory.add_classes(rows, feats, method=c.selection, budget=budget, seed=params.seed,
                           calibration_share=c.calibration_share)
    return memory
