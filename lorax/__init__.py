"""lorax: continual attribution of generated images (LoRAX) and transferable detection (CLIP-MoLE)."""

import os as _os

# No telemetry from the tools we drive, whoever imports us first.
for _k, _v in {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    _os.environ.setdefault(_k, _v)

__version__ = "0.1.0"
