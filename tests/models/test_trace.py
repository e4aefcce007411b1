"""The trace expert (lorax/models/trace.py) and its native-resolution patches (lorax/data/patches.py): a fixed
high-pass front end, and pixels fed exactly as decoded (never resized)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lorax.data.dataset import ManifestDataset
from lorax.data.images import load_rgb
from lorax.data.manifest import file_sha256
from lorax.data.patches import NativePatches, cut, grid_boxes, pad_to_patch, train_boxes
from lorax.models.trace import HighPass, TraceExpert


def test_the_high_pass_front_end_is_fixed():
    expert = TraceExpert(width=4, depth=2, dim=8)
    assert list(expert.highpass.parameters()) == []  # a buffer, not a parameter: no optimizer ever sees it
    kernel = expert.highpass.kernel.clone()
    x = torch.randint(0, 256, (2, 3, 3, 16, 16), dtype=torch.uint8)
    opt = torch.optim.SGD(expert.parameters(), lr=1.0)
    expert(x).square().sum().backward()
    opt.step()
    assert torch.equal(expert.highpass.kernel, kernel)
    # no graph through the front end: nothing flows back to the pixels
    pixels = (torch.rand(1, 2, 3, 16, 16) * 255).requires_grad_()
    expert(pixels).sum().backward()
    assert pixels.grad is None


def test_the_high_pass_removes_flat_colour_and_keeps_edges():
    hp = HighPass(1.0)
    flat = torch.full((1, 3, 16, 16), 120.0)
    assert hp(flat).abs().max() < 1e-5
    edge = flat.clone()
    edge[..., 8:] = 200.0
    assert hp(edge).abs().max() > 0.05


def test_expert_shapes_and_patch_mean():
    torch.manual_seed(0)
    expert = TraceExpert(width=4, depth=3, dim=8).eval()
    x = torch.randint(0, 256, (3, 5, 3, 16, 16), dtype=torch.uint8)
    out = expert(x)
    assert out.shape == (3, 8)
    per_patch = expert.patch_embeddings(x.flatten(0, 1)).view(3, 5, 8).mean(1)
    assert torch.allclose(out, per_patch, atol=1e-6)
    with pytest.raises(ValueError, match="patches"):
        expert(x[0])


def _image(path, w: int, h: int, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _rows(tmp_path, sizes: list[tuple[int, int]]) -> pd.DataFrame:
    rows = []
    for i, (w, h) in enumerate(sizes):
        _image(tmp_path / f"{i}.png", w, h, i)
        rows.append({"root": str(tmp_path), "path": f"{i}.png", "class_id": 0, "width": w, "height": h,
                     "sha256": file_sha256((tmp_path / f"{i}.png").read_bytes())})
    return pd.DataFrame(rows)


def test_patches_are_the_decoded_pixels_at_their_boxes_never_resized(tmp_path, monkeypatch):
    df = _rows(tmp_path, [(40, 30), (33, 57)])
    p, n = 16, 5
    boxes = [train_boxes(40, 30, p, n, seed=7), grid_boxes(33, 57, p, n)]
    ds = NativePatches(ManifestDataset(df, train=False, crop=p), [0, 1], boxes)

    def no_resize(*a, **k):
        raise AssertionError("the trace path resized an image")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    monkeypatch.setattr(Image.Image, "thumbnail", no_resize)
    monkeypatch.setattr(torch.nn.functional, "interpolate", no_resize)
    for i in range(2):
        x, item = ds[i]
        assert item == i and x.dtype == torch.uint8 and x.shape == (n, 3, p, p)
        full = load_rgb(tmp_path / f"{i}.png")
        for j, (left, top, right, bottom) in enumerate(boxes[i]):
            assert np.array_equal(x[j].permute(1, 2, 0).numpy(), full[top:bottom, left:right])


def test_an_image_smaller_than_the_patch_is_mirror_padded_not_resized(tmp_path):
    df = _rows(tmp_path, [(10, 6)])
    full = load_rgb(tmp_path / "0.png")
    box = grid_boxes(10, 6, 16, 1)
    assert box == [(0, 0, 16, 16)]
    x, _ = NativePatches(ManifestDataset(df, train=False, crop=16), [0], [box])[0]
    got = x[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got[:6, :10], full)  # its own pixels, where they were
    assert np.array_equal(got[6:12, :10], full[::-1])  # then their mirror image
    assert np.array_equal(pad_to_patch(full, 4), full)  # large enough: untouched
    assert cut(full, [(0, 0, 3, 3)]).shape == (1, 3, 3, 3)


def test_a_changed_file_is_refused(tmp_path):
    df = _rows(tmp_path, [(20, 20)])
    _image(tmp_path / "0.png", 20, 20, 99)  # the file changed after preparation
    ds = NativePatches(ManifestDataset(df, train=False, crop=8), [0], [grid_boxes(20, 20, 8, 2)])
    with pytest.raises(Exception, match="changed|sha256"):
        ds[0]
