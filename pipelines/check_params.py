"""DVC stage ``check``: the settings are checked before any stage removes an output.

``python -m pipelines.check_params``.

DVC removes a stage's outputs before it runs the stage's command, so a stage that only then finds a bad value in
params.yaml has already lost its outputs (and ``init`` its MLflow parent run). This stage depends on the whole of
params.yaml and comes first: every stage is downstream of its record (``init`` and ``synth@T`` depend on it, and all
others on them), so a bad value or an unknown key anywhere in the file stops ``dvc repro`` here, with one line,
before anything is removed. Its record never changes with the values (a checked file is a checked file), so a
change that passes the check re-runs only the stages that declare the changed setting.
"""

from __future__ import annotations

from pathlib import Path

from lorax.config import ConfigError, Params
from lorax.utils.io import write_json
from pipelines._stage import exit_now, run_stage
from pipelines.layout import Layout

RECORD = "reports/params.checked.json"  # relative to the project root; dvc.yaml names it too
# the methods lorax/continual/methods.py registers (tests/faults checks the list): known without importing torch
BUILTIN_METHODS = ("der", "finetune", "joint", "lorax", "probe")


def check_settings(params: Params) -> None:
    """What :func:`lorax.config.load_params` cannot see on its own: names resolved by registries and templates."""
    from pipelines.tracking.tracker import experiment_name

    if params.continual.method not in BUILTIN_METHODS:
        from lorax.continual.trace_methods import METHODS  # registers every method (imports torch)

        if params.continual.method not in METHODS:
            raise ConfigError(f"continual.method: unknown method {params.continual.method!r}; allowed: "
                              f"{', '.join(METHODS.names())}")
    experiment_name(params)  # tracking.experiment's placeholders


def check_step(params: Params, layout: Layout) -> Path:
    """Check the settings (loading them already did most of it) and write the constant record."""
    check_settings(params)
    return write_json(layout.project / RECORD, {"settings": "params.yaml", "checked": True})


if __name__ == "__main__":
    exit_now(run_stage("check", check_step, task=False))
