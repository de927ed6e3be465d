"""Structured logging for every adloop process (JSON lines or a console renderer)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


class _Stderr:
    """Writes to whatever ``sys.stderr`` is now (pytest swaps and closes it)."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str | None = None, json: bool | None = None) -> None:
    """Set up structlog once per process.

    ``ADLOOP_LOG_LEVEL`` (default INFO) and ``ADLOOP_LOG_JSON`` (default: JSON when
    stderr is not a terminal) pick the level and the renderer.
    """
    level = (level or os.environ.get("ADLOOP_LOG_LEVEL", "INFO")).upper()
    if json is None:
        env = os.environ.get("ADLOOP_LOG_JSON")
        json = (env == "1") if env is not None else not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    for noisy in ("kafka", "aiokafka", "faust", "mode", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
