"""``create_backbone`` from every kind of ``model.pretrained``, and the weights record a state keeps."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import save_file

from lorax.models.backbone_factory import create_backbone, weights_record
from tests.helpers import tiny_params


def test_weights_record_names_the_file_and_its_hash(tmp_path):
    cfg = tiny_params(tmp_path).model
    assert cfg.pretrained is None and weights_record(cfg) is None  # random init: nothing to record
    src = create_backbone(cfg)
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    cfg = cfg.model_copy(update={"pretrained": str(path)})
    rec = weights_record(cfg)
    assert rec == {"pretrained": str(path), "file": str(path), "bytes": path.stat().st_size,
                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    loaded = create_backbone(cfg)
    assert all(torch.equal(a, b) for a, b in zip(src.model.state_dict().values(), loaded.model.state_dict().values(),
                                                 strict=True))
    save_file({k: v.contiguous() + 1 for k, v in src.model.state_dict().items()}, str(path))  # replaced weights
    assert weights_record(cfg)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() != rec["sha256"]
