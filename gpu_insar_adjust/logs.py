"""Logging with stage timings, and progress bars that switch themselves off when not on a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

LOGGER_NAME = "gpu_insar_adjust"
T = TypeVar("T")

#: Wall-clock seconds per stage name, accumulated over the process (reported in summary.json).
STAGE_TIMES: dict[str, float] = {}


def get_logger(name: str | None = None) -> logging.Logger:
    """The package logger, or a child of it (``get_logger("network")``)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def setup_logging(level: str | int = "INFO", *, rich: bool | None = None, logfile: str | None = None) -> None:
    """Configure the package logger: rich console output on a terminal, plain text otherwise, optional file."""
    logger = get_logger()
    logger.setLevel(level if isinstance(level, int) else level.upper())
    for h in list(logger.handlers):
        logger.removeHandler(h)
    use_rich = sys.stderr.isatty() if rich is None else rich
    if use_rich:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    if logfile:
        fh = logging.FileHandler(logfile)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(fh)
    logger.propagate = False


@contextlib.contextmanager
def stage(name: str, logger: logging.Logger | None = None) -> Iterator[None]:
    """Log the start and duration of a processing stage and record it in :data:`STAGE_TIMES`."""
    log = logger or get_logger()
    log.info("%s ...", name)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        STAGE_TIMES[name] = STAGE_TIMES.get(name, 0.0) + dt
        log.info("%s done in %.2f s", name, dt)
        from .backend import trim_host_memory

        trim_host_memory()  # what the stage freed goes back to the system before the next one allocates


def progress(iterable: Iterable[T], description: str, total: int | None = None,
             enabled: bool | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on a terminal; a plain iteration otherwise (logs, CI, pipes)."""
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)
