"""The physical floor of a stream: one frozen-backbone forward of every crop the stream must see at least once.

Every training image's fixed views (``train.views``) and every validation image's eval crops
(``eval.crops``) go once through the frozen backbone (decoding included, no adapter, no gradient). A continual
stream cannot cost less than this on the same machine; ``benchmarks.realworld --floor`` measures it in the same
run as the streams, so their ratio is side by side.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def stream_floor(params: Any, manifests: Path) -> dict[str, Any]:
    """Seconds and crop count of the floor for ``params``' stream (manifests prepared in ``manifests``)."""
    from lorax.data.dataset import crop_boxes, to_tensor
    from lorax.data.images import crop_image, open_image, to_rgb_array
    from lorax.data.manifest import abs_paths, load_stream_manifests
    from lorax.models.backbone_factory import create_backbone

    backbone = create_backbone(params.model).eval()
    mean, std = backbone.info.mean, backbone.info.std
    size = params.model.img_size
    frames = load_stream_manifests(manifests, params.tasks)
    jobs = []
    for df in frames.values():
        for split, n in (("train", max(1, params.train.views)), ("val", params.eval.crops)):
            jobs += [(p, n) for p in abs_paths(df[df["split"] == split])]
    t0, crops, batch = time.time(), 0, []
    for path, n in tqdm(jobs, desc="floor: frozen forward of every crop once", unit="img"):
        img = open_image(path, params.data.max_image_pixels, name=path)
        w, h = img.size
        batch += [to_tensor(to_rgb_array(crop_image(img, b, path), path), mean, std)
                  for b in crop_boxes(w, h, size, n)]
        if len(batch) >= params.eval.batch_size * max(1, params.eval.crops):
            backbone(torch.stack(batch))
            crops, batch = crops + len(batch), []
    if batch:
        backbone(torch.stack(batch))
        crops += len(batch)
    return {"seconds": round(time.time() - t0, 1), "crops": crops, "images": len(jobs)}
