"""The ``lorax`` command. Each area of the library adds its own sub-commands (``add_commands``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lorax.config import ConfigError

# Modules that contribute sub-commands; each defines ``add_commands(subparsers)``.
COMMAND_MODULES = [
    "lorax.data.commands",
    "lorax.continual.commands",
    "lorax.models.commands",
    "lorax.tracking.commands",
    "lorax.detect.commands",
    "lorax.serving.commands",
    "lorax.ops_commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # area not built yet
                continue
            raise
        mod.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        rc = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"lorax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorax: interrupted; finished tasks are kept and the next run resumes", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
