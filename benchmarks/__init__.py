"""Benchmarks and experiments (not tests), run from a checkout: ``python -m benchmarks.NAME``.

``benchmarks/README.md`` indexes them (question, command, output, where the figures are recorded); the speed
figures, with machine, date, command and load, are kept in ``benchmarks/RESULTS.md``.
"""

import json
import sys
from pathlib import Path
from typing import Any


def emit_json(result: dict[str, Any], out: str | None, to_stdout: bool) -> None:
    """Write a benchmark's JSON result to ``out`` (when given) and print it (``--json``)."""
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if to_stdout:
        json.dump(result, sys.stdout, indent=2)
        print()
