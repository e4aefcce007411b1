"""Fixtures of the pipeline tests: a real Prefect API (the projects on disk and DVC helpers: tests/helpers.py)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import (  # noqa: F401  (re-exported: tests import them from tests.helpers)
    BIN,
    REPO,
    dvc,
    dvc_project,
    stages_ran,
    tool_env,
    write_project,
)


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (a real server in a subprocess) for every flow test of the session."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
