"""The orchestration of lorax: the pipeline's steps over a project's folders (:mod:`pipelines.steps`,
:mod:`pipelines.publish`), MLflow tracking and registry (:mod:`pipelines.tracking`), the served model
(:mod:`pipelines.serving`), the drivers (DVC stage scripts ``python -m pipelines.<stage>``, Prefect flows, the
``lorax`` command, torchrun) and project edits (streams, locks). See docs/architecture.md."""

import os as _os

# No telemetry from the tools we drive, whoever imports us first.
for _k, _v in {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    _os.environ.setdefault(_k, _v)
