"""The built-in pretext-trained backbone: real training, cached by settings, loadable as model.pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorax.models.backbone_factory import create_backbone
from lorax.models.pretext import OPS, degrade, pretext_checkpoint
from tests.helpers import tiny_params


@pytest.mark.parametrize("op", OPS)
def test_degrade_ops_keep_shape_and_range(op: str):
    rng = np.random.default_rng(0)
    img = rng.random((24, 24, 3))
    out = degrade(img, op, rng)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    if op != "identity":
        assert np.abs(out - img).mean() > 1e-3  # the operation leaves a trace


def test_unknown_op():
    with pytest.raises(ValueError, match="allowed"):
        degrade(np.zeros((8, 8, 3)), "swirl", np.random.default_rng(0))


def test_pretext_alias_builds_once_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAX_WEIGHTS_CACHE", str(tmp_path / "cache"))
    p = tiny_params(tmp_path, model__pretrained="pretext", model__pretext={"n_images": 64, "epochs": 1, "batch_size": 16})
    ck = pretext_checkpoint(p.model)
    assert ck.is_file() and ck.with_suffix(".json").is_file()
    mtime = ck.stat().st_mtime_ns
    assert pretext_checkpoint(p.model) == ck and ck.stat().st_mtime_ns == mtime  # cached, not retrained
    trained = create_backbone(p.model)
    random = create_backbone(p.model.model_copy(update={"pretrained": None}))
    assert trained.info.pretrained
    diffs = [(a - b).abs().max().item() for a, b in zip(trained.parameters(), random.parameters(), strict=True)]
    assert max(diffs) > 0  # the weights were trained, and they are what gets loaded
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(trained(x)).all()
