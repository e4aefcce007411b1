"""Progress of the steps that take more than a few seconds (evaluation passes, the head and verdict fits, exemplar
selection): a tqdm bar where a person watches a terminal, and an INFO log line at the start and the end (with the
elapsed seconds) everywhere, because tqdm is off in non-TTY logs (DVC logs, Prefect, CI) and would otherwise leave
minutes of silence there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm


def bar(iterable: Iterable | None = None, desc: str = "", total: int | None = None, **kwargs: Any) -> tqdm:
    """A transient tqdm bar configured like every bar of the code base: off when stderr is not a terminal
    (``disable=None``: no bar spam in logs), gone when done, redrawn at most once a second."""
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None, mininterval=1.0, **kwargs)


@contextmanager
def timed(logger: logging.Logger, what: str) -> Iterator[None]:
    """Log ``what`` when it starts and, with the elapsed seconds, when it ends (or fails)."""
    logger.info("%s ...", what)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        logger.info("%s: stopped after %.1f s", what, time.perf_counter() - t0)
        raise
    logger.info("%s: done in %.1f s", what, time.perf_counter() - t0)
