"""Safe decoding and the RGB conversion rules (lorax/data/images.py). Bad files are made in tmp_path."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorax.data.images import BadImage, DataError, inspect_image, load_rgb, open_image
from tests.helpers import png_header_only


def _rgb(h: int = 40, w: int = 36, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "x.png")
    out = load_rgb(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (40, 36, 3)
    np.testing.assert_array_equal(out, a)
    info = inspect_image(tmp_path / "x.png", min_size=32)
    assert (info.width, info.height, info.mode) == (36, 40, "RGB")
    assert len(info.sha256) == 64 and info.sha256 != info.pixel_sha256


def test_grey_and_bilevel_replicate_channels(tmp_path: Path) -> None:
    g = np.random.default_rng(1).integers(0, 256, (20, 20), dtype=np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    Image.fromarray(g > 127).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    out = load_rgb(tmp_path / "b.png")
    assert set(np.unique(out)) <= {0, 255}
    np.testing.assert_array_equal(out[..., 0] == 255, g > 127)


def test_16bit_grey_keeps_high_byte(tmp_path: Path) -> None:
    v = np.array([[0, 255, 256, 65535], [1000, 30000, 40000, 65280]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "d.png")
    img = Image.open(tmp_path / "d.png")
    assert img.mode.startswith("I")
    out = load_rgb(tmp_path / "d.png")
    np.testing.assert_array_equal(out[..., 1], (v >> 8).astype(np.uint8))
    assert inspect_image(tmp_path / "d.png").mode == img.mode  # manifest keeps the original mode


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = [200, 100, 0]
    rgba[..., 3] = [[255, 0, 128], [255, 255, 255]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], [200, 100, 0])  # opaque: exact
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])  # transparent: white
    np.testing.assert_array_equal(out[0, 2], [227, 177, 127])  # round((c*128 + 255*127)/255)
    la = np.stack([np.full((2, 2), 10, np.uint8), np.array([[255, 0], [0, 255]], np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_rgb(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0, 0], [10, 10, 10])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert inspect_image(tmp_path / "la.png").mode == "LA"


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    pal = [10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9)
    p = Image.fromarray(idx, "P")
    p.putpalette(pal)
    p.save(tmp_path / "p.png")
    out = load_rgb(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0, 1], [40, 50, 60])
    p.save(tmp_path / "pt.png", transparency=1)
    out = load_rgb(tmp_path / "pt.png")
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])  # transparent index -> white
    # the dataset crops before converting: the transparency must survive the crop
    np.testing.assert_array_equal(load_rgb(tmp_path / "pt.png", box=(1, 0, 2, 1))[0, 0], [255, 255, 255])


def test_cmyk_uses_pillows_conversion(tmp_path: Path) -> None:
    img = Image.new("CMYK", (4, 4), (10, 20, 30, 40))
    img.save(tmp_path / "c.tif")
    out = load_rgb(tmp_path / "c.tif")
    np.testing.assert_array_equal(out[0, 0], np.asarray(img.convert("RGB"))[0, 0])
    assert inspect_image(tmp_path / "c.tif").mode == "CMYK"


def test_float_mode_is_rejected(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(BadImage, match="unsupported mode F"):
        load_rgb(tmp_path / "f.tif")


def test_crop_box_equals_crop_of_full_conversion(tmp_path: Path) -> None:
    rgba = np.random.default_rng(3).integers(0, 256, (30, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    full = load_rgb(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png", box=(5, 7, 21, 23)), full[7:23, 5:21])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"this is not an image at all" * 10), "not an image"),
        (lambda p: p.mkdir(), "unreadable: a directory"),
        (lambda p: p.symlink_to(p.parent / "missing.png"), "unreadable: dangling symlink"),
    ],
    ids=["zero-byte", "non-image", "directory", "dangling-symlink"],
)
def test_bad_files_give_reasons(tmp_path: Path, make, reason: str) -> None:
    p = tmp_path / "x.png"
    make(p)
    with pytest.raises(BadImage, match=reason) as ei:
        inspect_image(p)
    assert str(p) in str(ei.value) and isinstance(ei.value, DataError)


def test_truncated_png_and_jpeg(tmp_path: Path) -> None:
    for ext in ("png", "jpg"):
        p = tmp_path / f"t.{ext}"
        Image.fromarray(_rgb(64, 64)).save(p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(BadImage, match="truncated|corrupt"):
            inspect_image(p)


def test_bomb_over_our_limit_is_rejected_before_decoding(tmp_path: Path) -> None:
    # header says 1000x1000 but there is no real pixel data: decoding it would fail as "truncated"/"corrupt"
    p = png_header_only(tmp_path / "bomb.png", 1000, 1000)
    with pytest.raises(BadImage, match=r"decompression bomb: 1000x1000 = 1000000 pixels > .*=999999 \(not decoded\)"):
        inspect_image(p, max_pixels=999_999)
    assert open_image(p, max_pixels=1_000_000).size == (1000, 1000)


def test_pillows_own_bomb_error_and_warning_become_reasons(tmp_path: Path) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    huge = png_header_only(tmp_path / "huge.png", 20000, 20000)  # > 2x Pillow's limit: DecompressionBombError
    warn = png_header_only(tmp_path / "warn.png", 10000, 9000)  # between 1x and 2x: DecompressionBombWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warning escapes either
        for p in (huge, warn):
            with pytest.raises(BadImage, match="decompression bomb"):
                inspect_image(p, max_pixels=limit)
    assert Image.MAX_IMAGE_PIXELS == limit


def test_smaller_than_crop(tmp_path: Path) -> None:
    Image.fromarray(_rgb(40, 20)).save(tmp_path / "s.png")
    with pytest.raises(BadImage, match=r"smaller than crop 32 \(20x40\)"):
        inspect_image(tmp_path / "s.png", min_size=32)
    assert inspect_image(tmp_path / "s.png", min_size=20).width == 20


def test_pixel_hash_ignores_encoding_file_hash_does_not(tmp_path: Path) -> None:
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png", compress_level=1)
    Image.fromarray(a).save(tmp_path / "b.png", compress_level=9)
    ia, ib = inspect_image(tmp_path / "a.png"), inspect_image(tmp_path / "b.png")
    assert ia.sha256 != ib.sha256 and ia.pixel_sha256 == ib.pixel_sha256
