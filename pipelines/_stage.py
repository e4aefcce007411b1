"""Shared driver of the DVC stage scripts (``python -m pipelines.<stage> [TASK]``).

A stage script only parses its arguments and calls one step of :mod:`pipelines.steps` (or :mod:`pipelines.publish`); a settings, data or tracking
problem ends the stage with exit status 2 and a one-paragraph message instead of a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUIET = ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "filelock", "git")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


class ImportClock:
    """Seconds spent in ``import`` statements (outermost ones only), so that the imports a step makes lazily count
    as start-up, not as the step's work. Installed only while ``LORAX_STAGE_TIMES`` is set."""

    def __init__(self) -> None:
        import builtins

        self.seconds, self._depth, self._real = 0.0, 0, builtins.__import__
        builtins.__import__ = self._import

    def _import(self, *args: Any, **kwargs: Any) -> Any:
        if self._depth:
            return self._real(*args, **kwargs)
        self._depth, t0 = 1, time.perf_counter()
        try:
            return self._real(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self._depth = 0


IMPORTS = ImportClock() if os.environ.get("LORAX_STAGE_TIMES") else None


def run_stage(name: str, step: str | Callable[..., Any], *, task: bool = True, tracking: bool = False) -> int:
    """Parse ``[TASK] [--params P] [--root R]``, load the settings and call ``step(params, layout[, task][, tracker])``.

    ``step``: the function, or ``"module:function"`` (imported only here: a stage started as ``python -m`` first
    hands itself to the warm stage server, :mod:`pipelines.warm`, before importing anything heavy)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    from pipelines import lifetime

    if main_spec is not None and main_spec.name.startswith("pipelines."):
        from pipelines import warm

        if not os.environ.get(warm.CHILD_ENV):  # a warm stage lives as long as its client, which watches
            lifetime.die_with_starter()
        if warm.enabled():
            code = warm.run_warm(main_spec.name, sys.argv[1:])
            if code is not None:
                return code
    if isinstance(step, str):
        import importlib

        module, _, func = step.partition(":")
        step = getattr(importlib.import_module(module), func)
    lifetime.stop_on_signals()
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{name}", description=step.__doc__)
    if task:
        parser.add_argument("task", help="task (generator) name, a key of params.yaml stream")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".", help="project root (paths in params.yaml are relative to it)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)
    label = f"{name}@{args.task}" if task else name

    from lorax.config import ConfigError, load_params
    from pipelines.layout import Layout
    from pipelines.tracking.uri import TrackingUnavailable

    try:
        params = load_params(Path(args.root) / args.params)
        layout = Layout.from_params(params, args.root)
        call: list[Any] = [params, layout]
        if task:
            call.append(args.task)
        if tracking:
            from pipelines.tracking.tracker import Tracker

            call.append(Tracker(params, args.root))
        t0, imports0 = time.time(), IMPORTS.seconds if IMPORTS else 0.0
        step(*call)
        record_times(label, t0, (IMPORTS.seconds - imports0) if IMPORTS else 0.0)
    except (ConfigError, TrackingUnavailable, FileNotFoundError, ValueError, lifetime.TaskBusy) as e:
        print(f"stage {label}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stage {label}: interrupted; re-run `dvc repro` to resume", file=sys.stderr)
        return 130
    except lifetime.Stopped as e:
        print(f"stage {label}: {e}; re-run `dvc repro` to resume", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        from pipelines.tracking.errors import store_failure

        line = store_failure(e)
        if line is None:
            raise
        print(f"stage {label}: error: {line}", file=sys.stderr)
        return 2
    return 0


def process_start() -> float:
    """When this process started (epoch seconds; Linux /proc), so start-up cost is measured from exec, not import."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def record_times(label: str, step_start: float, step_imports: float = 0.0) -> None:
    """``LORAX_STAGE_TIMES=FILE``: append one JSON line per stage (start-up before the step, the step's own work),
    the measurement behind docs/results.md's start-up share of ``dvc repro`` (benchmarks/stage_overhead.py)."""
    import json

    now = time.time()
    if path := os.environ.get("LORAX_STAGE_TIMES"):
        with open(path, "a") as f:
            f.write(json.dumps({"stage": label, "startup_s": round(step_start - process_start(), 3),
                                "step_s": round(now - step_start, 3), "step_imports_s": round(step_imports, 3),
                                "warm": bool(os.environ.get("LORAX_WARM_CHILD")), "end": round(now, 3)}) + "\n")


def exit_now(code: int) -> None:
    """End a stage process: finish what exit would (threads, atexit handlers, logs, output), then skip the rest.

    Python's interpreter teardown with torch, transformers and mlflow loaded takes seconds (benchmarks/RESULTS.md,
    pipeline overhead), paid by every stage of every ``dvc repro``; nothing a stage writes needs it (files are closed by the
    steps, MLflow writes synchronously). So after the same clean-up as a normal exit the process ends at once.
    """
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()  # what interpreter exit runs first (mlflow, tqdm, logging shutdown)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
