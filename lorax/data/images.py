"""Safe image decoding and the one RGB conversion used everywhere (preparation, training, prediction).

Generator fingerprints live in exact pixel values, so every image must reach the model through the same path.
Preparation, the training Dataset and ``lorax predict`` all call :func:`open_image` + :func:`to_rgb_array`.

Conversion rules (original mode -> 8-bit RGB; the original mode is kept in the manifest's ``mode`` column):

* ``RGB``: unchanged. ``RGBX``: padding byte dropped. ``YCbCr``, ``HSV``: Pillow's own conversion.
* ``1``, ``L``: grey copied to R=G=B (``1`` gives 0/255).
* ``I;16*``, ``I`` (16-bit grey): clipped to 0..65535 and reduced to the high byte (``v >> 8``), the same rule
  Pillow applies itself when it decodes 48-bit RGB PNGs, so 16-bit grey and 16-bit colour agree.
* ``P``: palette expanded; a palette with transparency becomes ``RGBA`` first (next rule).
* ``RGBA``, ``RGBa``, ``LA``, ``La``, ``PA`` (alpha): composited on white,
  ``out = round((c * a + 255 * (255 - a)) / 255)``. Fully opaque images (the common "unused alpha" PNG) keep
  their exact RGB values; transparent areas become white as any viewer shows them.
* ``CMYK``: Pillow's profile-free conversion (ICC profiles are ignored, as in training).
* ``F`` (float), ``LAB`` and anything else: rejected as unsupported (no single correct 8-bit mapping).

No EXIF rotation is applied: the pixel grid is used as stored, so ``width``/``height`` match the file.
Multi-frame files (GIF, TIFF stacks) use their first frame.

Safety: the pixel count is checked from the header before any decoding (decompression bombs are rejected
without decoding them), and Pillow's own ``DecompressionBombError``/``DecompressionBombWarning`` become a
:class:`BadImage` instead of a crash or a stray warning.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow's own default; ``data.max_image_pixels`` in params.yaml overrides it for lorax.
DEFAULT_MAX_PIXELS = 89_478_485

_GREY_16 = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}
_PILLOW_CONVERTS = {"RGBX", "YCbCr", "HSV", "CMYK"}


class DataError(ValueError):
    """A dataset problem; the message names the file or folder and the fix."""


class BadImage(DataError):
    """One file that cannot be used (quarantined by preparation). ``reason`` is the short cause."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # crosses process boundaries (parallel preparation, DataLoader workers)
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class ImageInfo:
    """What preparation records about a good image."""

    sha256: str  # of the file bytes
    pixel_sha256: str  # of the converted RGB pixels (catches re-encoded copies)
    width: int
    height: int
    mode: str  # original Pillow mode


def _allow_pixels(max_pixels: int) -> None:
    # Pillow refuses images above 2x its global limit at open time. Raise that limit (never lower it) to ours,
    # so the check that applies is always data.max_image_pixels.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


_SPECIAL = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
            (stat.S_ISBLK, "block device"))


def special_kind(mode: int) -> str | None:
    """What a non-regular, non-directory file is ("FIFO", "socket", ...); None for regular files and folders."""
    return next((name for test, name in _SPECIAL if test(mode)), None)


def _refuse_non_regular(p: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise BadImage(p, "unreadable: a directory, not an image file")
    if not stat.S_ISREG(mode):
        raise BadImage(p, f"not a regular file ({special_kind(mode) or 'unknown type'}); refused without opening it")


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, or :class:`BadImage` saying why it cannot be read.

    Only regular files are read: a FIFO, socket or device is refused from its ``stat`` without opening it (reading
    a FIFO blocks forever, a device never ends). The open is non-blocking and re-checked, so a FIFO swapped in after
    the ``stat`` cannot hang the caller either.
    """
    p = Path(path)
    try:
        _refuse_non_regular(p, p.stat().st_mode)
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            _refuse_non_regular(p, os.fstat(f.fileno()).st_mode)
            return f.read()
    except FileNotFoundError:
        reason = "unreadable: dangling symlink" if p.is_symlink() else "unreadable: file vanished"
        raise BadImage(p, reason) from None
    except IsADirectoryError:
        raise BadImage(p, "unreadable: a directory, not an image file") from None
    except OSError as e:
        raise BadImage(p, f"unreadable: {e.strerror or e}") from None


def _bomb(name: str | Path, size: str, max_pixels: int) -> BadImage:
    """One limit in the message (ours, never Pillow's own), and how to raise it."""
    return BadImage(name, f"decompression bomb: {size} > data.max_image_pixels={max_pixels} (not decoded); "
                          f"if the image is genuine, raise data.max_image_pixels")


def open_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | Path = "") -> Image.Image:
    """Open an image lazily (header only) and reject decompression bombs before decoding.

    ``source`` is a path or the file's bytes (then ``name`` names it in errors). Raises :class:`BadImage`.
    """
    name = name or (source if not isinstance(source, bytes) else "<bytes>")
    data = source if isinstance(source, bytes) else read_bytes(source)
    if not data:
        raise BadImage(name, "empty file (0 bytes)")
    _allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))  # Pillow: "Image size (N pixels) exceeds limit of M pixels"
        raise _bomb(name, f"{found.group(1)} pixels" if found else "its pixel count", max_pixels) from None
    except UnidentifiedImageError:
        raise BadImage(name, "not an image (Pillow cannot identify it)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(name, f"corrupt header: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise _bomb(name, f"{w}x{h} = {w * h} pixels", max_pixels)
    if w < 1 or h < 1:
        raise BadImage(name, f"empty image ({w}x{h})")
    return img


def decode(img: Image.Image, name: str | Path = "") -> None:
    """Decode the pixels now; truncated or corrupt data become :class:`BadImage`."""
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        reason = "truncated" if "truncated" in str(e) else "corrupt"
        raise BadImage(name, f"{reason}: {e}") from None
    except Image.DecompressionBombError as e:  # e.g. an oversized PNG text chunk
        raise BadImage(name, f"decompression bomb: {e}") from None


def _composite_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c = colour.astype(np.uint32)
    a = alpha.astype(np.uint32)[..., None] if colour.ndim == 3 else alpha.astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _grey_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=2)


def to_rgb_array(img: Image.Image, name: str | Path = "") -> np.ndarray:
    """Decode (if needed) and convert to an HxWx3 uint8 array by the module's rules. Raises :class:`BadImage`."""
    decode(img, name)
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)
    if mode in ("L", "1"):
        return _grey_to_rgb(np.asarray(img.convert("L"), dtype=np.uint8))
    if mode in _GREY_16:
        a = np.asarray(img)
        a = np.clip(a.astype(np.int64), 0, 65535) >> 8
        return _grey_to_rgb(a.astype(np.uint8))
    if mode == "P":
        has_alpha = "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
        if mode == "RGB":
            return np.array(img, dtype=np.uint8)
    if mode in _ALPHA:
        if mode in ("LA", "La"):
            la = np.asarray(img.convert("LA") if mode == "La" else img, dtype=np.uint8)
            return _grey_to_rgb(_composite_on_white(la[..., 0], la[..., 1]))
        rgba = np.asarray(img.convert("RGBA") if mode != "RGBA" else img, dtype=np.uint8)
        return _composite_on_white(rgba[..., :3], rgba[..., 3])
    if mode in _PILLOW_CONVERTS:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    raise BadImage(name, f"unsupported mode {mode}: save the image as 8- or 16-bit grey or RGB(A)")


def load_rgb(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Safely load ``path`` as HxWx3 uint8 RGB; ``box`` (left, top, right, bottom) crops before converting.

    Every conversion rule is per pixel, so cropping first gives exactly the pixels of converting first.
    """
    img = open_image(path, max_pixels)
    if box is not None:
        img = crop_image(img, box, path)
    return to_rgb_array(img, path)


def crop_image(img: Image.Image, box: tuple[int, int, int, int], name: str | Path = "") -> Image.Image:
    """Decode ``img`` and cut ``box`` out of it, keeping the metadata the conversion rules read."""
    decode(img, name)
    info = img.info
    out = img.crop(box)
    out.info = info  # keeps palette transparency for the conversion rules
    return out


def inspect_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 0) -> ImageInfo:
    """Verify one file by decoding it fully once; raises :class:`BadImage` with the quarantine reason."""
    data = read_bytes(path)
    img = open_image(data, max_pixels, name=path)
    w, h = img.size
    if min(w, h) < min_size:
        raise BadImage(path, f"smaller than crop {min_size} ({w}x{h}); crop, never resize")
    mode = img.mode
    rgb = to_rgb_array(img, path)
    ph = hashlib.sha256(f"{w}x{h}:".encode())
    ph.update(np.ascontiguousarray(rgb).tobytes())
    return ImageInfo(hashlib.sha256(data).hexdigest(), ph.hexdigest(), w, h, mode)
