"""lorax: continual attribution of generated images (LoRAX) and transferable detection (CLIP-MoLE).

The library: data, models, continual learning, detection, inference. It imports nothing from MLflow, Prefect or
DVC and knows no project layout; the pipeline that drives it (steps, tracking, registry, flows, the ``lorax``
command) is the top-level package ``pipelines``.
"""

__version__ = "0.1.0"
