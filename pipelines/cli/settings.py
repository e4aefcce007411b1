"""The settings arguments of a command line: ``--params``, ``-S KEY=VALUE`` overrides and ``--method``, read back into
validated :class:`~lorax.config.Params` by :func:`lorax.config.load_params`. Only drivers parse command lines (the
``lorax`` command, ``pipelines.ddp``, the benchmarks), so this lives in ``pipelines/``, not in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lorax.config import DEFAULT_PARAMS, ConfigError, Params, load_params


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``-S KEY=VALUE`` items as ``{dotted key: YAML value}`` (the overrides of :func:`lorax.config.load_params`)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"-S {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"-S {item!r}: the value is not valid YAML ({e.problem or e})") from None
    return out


def add_settings_arguments(parser: Any, default: str | Path = DEFAULT_PARAMS, method: str | None = None,
                           overrides: bool = True) -> None:
    """Declare the settings arguments of a command: ``--params``, ``-S KEY=VALUE`` (unless ``overrides`` is off) and,
    given its help text, ``--method``; :func:`params_from_arguments` reads them back."""
    parser.add_argument("--params", default=str(default), help="settings file (default: %(default)s)")
    if overrides:
        parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a setting, e.g. -S train.epochs=2 (a YAML value; repeatable)")
    if method is not None:
        parser.add_argument("--method", help=method)


def params_from_arguments(args: Any, method_key: str | None = None,
                          extra: dict[str, Any] | None = None) -> Params:
    """The settings that :func:`add_settings_arguments`' arguments name: the file, ``-S`` overrides, then
    ``--method`` into ``method_key`` and the command's own ``extra`` overrides."""
    overrides = parse_overrides(getattr(args, "set", []))
    if method_key is not None and getattr(args, "method", None):
        overrides[method_key] = args.method
    overrides.update(extra or {})
    return load_params(args.params, overrides)
