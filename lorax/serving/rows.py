"""One value of a scoring request -> image bytes or that row's error, without trusting the caller.

The served model (:mod:`pipelines.serving.pyfunc`) answers whoever can reach its port, so a value it receives is data,
never an instruction to read the server's files: bytes and base64 text of an image always work; a file path is read
only when the operator allowed a root folder (:data:`ENV_ROOT`, or ``image_root`` saved with the model; the caller
cannot set it), and only when it resolves (``..``, symlinks) to a regular file inside that root. With no root a path
is refused from its text alone (the filesystem is never probed, so the answer says nothing about which files exist).
Errors name only what the caller sent, never the root or a resolved path.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_ROOT = "LORAX_SERVE_IMAGE_ROOT"
MAX_PATH_CHARS = 4096
PATHS_REFUSED = (
    "file paths are not accepted by this server; send the image bytes or base64, or start the server with "
    f"{ENV_ROOT}=<folder> to allow paths under a folder"
)
_DATA_URL = re.compile(r"^data:[\w.+/-]*;base64,", re.IGNORECASE)


class RootError(ValueError):
    """The operator's image root is unusable (the server should not start with it)."""


@dataclass(frozen=True)
class Row:
    """A parsed request value: ``data`` (image bytes) or ``error``; ``path`` is the caller's path when one was read."""

    data: bytes | None = None
    error: str | None = None
    path: str | None = None


def image_root(configured: str | None = None) -> str | None:
    """The resolved folder paths may be read from, or None (paths refused).

    :data:`ENV_ROOT` wins over ``configured`` (the model's saved ``image_root``); set but empty, it turns paths off.
    Raises :class:`RootError` when the folder does not exist: a typo must not silently refuse every path.
    """
    raw = os.environ.get(ENV_ROOT, configured)
    if not raw:
        return None
    real = os.path.realpath(os.path.expanduser(raw))
    if not os.path.isdir(real):
        source = ENV_ROOT if ENV_ROOT in os.environ else "the model's image_root"
        raise RootError(f"{source}={raw}: no such folder; set it to the folder the server may read images from, "
                        "or leave it unset to accept only image bytes and base64")
    return real


def parse_value(value: Any, root: str | None) -> Row:
    """Image bytes from ``value`` (bytes, base64 text, or a path under ``root``), or the reason it is refused."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Row(bytes(value)) if len(value) else Row(error="empty bytes")
    if value is None or (isinstance(value, float) and value != value):
        return Row(error="empty value (null); send the image bytes or base64 text")
    if not isinstance(value, str):
        return Row(error=f"expected image bytes or base64 text, got {type(value).__name__}")
    if not value.strip():
        return Row(error="empty string; send the image bytes or base64 text")
    data = _base64(value)
    if data is not None and (root is None or _is_image(data)):
        return Row(data)
    if root is None:
        if _looks_like_path(value):
            return Row(error=PATHS_REFUSED)
        return Row(error="not valid base64 (send the image file's bytes base64-encoded, standard alphabet)")
    return _read_under(value, root)


def _base64(text: str) -> bytes | None:
    """Decoded bytes when ``text`` is standard base64 (whitespace and a ``data:...;base64,`` prefix allowed)."""
    compact = "".join(_DATA_URL.sub("", text.strip(), count=1).split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data or None


def _is_image(data: bytes) -> bool:
    """Whether Pillow recognises ``data`` (header only): decides base64 vs path when both read validly."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).close()
    except UnidentifiedImageError:
        return False
    except Exception:  # noqa: BLE001 - recognised but broken (bomb, corrupt): an image, the scorer says why
        return True
    return True


def _looks_like_path(text: str) -> bool:
    """From the text alone (never the filesystem): separators, ``~``, a drive or a dot (base64 has none)."""
    return any(c in text for c in "/\\.") or text.startswith("~") or bool(re.match(r"^[A-Za-z]:", text))


def _read_under(text: str, root: str) -> Row:
    """The bytes of the regular file ``text`` names, when it resolves inside ``root`` (relative: to ``root``)."""
    if len(text) > MAX_PATH_CHARS or "\0" in text:
        return Row(error="neither base64 image bytes nor a usable file path")
    try:
        real = os.path.realpath(os.path.join(root, os.path.expanduser(text)))
    except (OSError, ValueError):
        return Row(error="neither base64 image bytes nor a usable file path")
    if os.path.commonpath([real, root]) != root:
        return Row(error="path outside the folder this server reads images from (after resolving '..' and "
                         "symlinks); send the image bytes or base64 instead")
    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            return Row(error="not a regular file (a folder, FIFO or device); send an image file", path=text)
        # O_NONBLOCK: a FIFO swapped in after the check cannot hang the worker; O_NOFOLLOW: nor can a new symlink
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return Row(error="no such file under the server's image folder (nor base64 image bytes)", path=text)
    except OSError as e:
        return Row(error=f"cannot open the file ({e.strerror or 'error'})", path=text)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return Row(error="not a regular file (a folder, FIFO or device); send an image file", path=text)
        try:
            data = fh.read()
        except OSError as e:
            return Row(error=f"cannot read the file ({e.strerror or 'error'})", path=text)
    return Row(data, path=text) if data else Row(error="empty file (0 bytes)", path=text)


def describe(root: str | None) -> str:
    """One line for the server log: what the model reads (the root only there, never in a response)."""
    return f"image paths allowed under {Path(root)}" if root else "image paths refused (bytes and base64 only)"
