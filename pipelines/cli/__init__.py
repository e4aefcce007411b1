"""The ``lorax`` command: one driver of the library and of the pipeline's steps. Each module of this package adds
the sub-commands of one area (``add_commands``); ``python -m pipelines.cli`` is the same command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lorax.config import ConfigError

# Modules that contribute sub-commands; each defines ``add_commands(subparsers)``.
COMMAND_MODULES = [
    "pipelines.cli.data",
    "pipelines.cli.train",
    "pipelines.cli.tune",
    "pipelines.cli.weights",
    "pipelines.cli.models",
    "pipelines.cli.detect",
    "pipelines.cli.serving",
    "pipelines.cli.project",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
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
    except Exception as e:
        from pipelines.tracking.errors import store_failure

        line = store_failure(e)
        if line is None:
            raise
        print(f"lorax: error: {line}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
