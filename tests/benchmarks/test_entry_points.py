"""Every benchmark script parses its command line: ``--help`` exits 0 and the ``-S`` overrides parse (a moved
helper once broke ``benchmarks.detect_t2i`` unseen, because no test started it)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import benchmarks

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))


@pytest.mark.parametrize("name", [n for n in MODULES
                                  if hasattr(importlib.import_module(f"benchmarks.{n}"), "main")])
def test_help_exits_cleanly(name: str, capsys) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_detector_benchmarks_parse_settings_overrides() -> None:
    from benchmarks.detect_t2i import _overrides

    assert _overrides(["detect.probe_c=0.1", "detect.head_init=zero"]) == {"detect.probe_c": 0.1,
                                                                          "detect.head_init": "zero"}
