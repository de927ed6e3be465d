"""A console people can read, for long runs (the demo, the benchmarks).

:class:`Console` keeps the terminal to the run's own lines (steps, a live progress
line, the summary) and sends everything else written to standard error — this process's
structured logs, the libraries' log lines and progress bars, the embedded broker's
output — to a log file under the run directory. ``verbose=True`` leaves standard error
on the terminal, as before. The managed processes (joiner, stats, learner, server) log to
their own files already (:class:`adloop.stack.ManagedProcess`).

The progress line is one line redrawn in place (rich, when standard output is a
terminal); elsewhere (a pipe, CI) each update is printed as a line of its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from streams.logs import configure_logging


class Console:
    """Steps and progress on stdout; stderr (logs) into ``log_path`` unless ``verbose``."""

    def __init__(self, log_path: Path, verbose: bool = False) -> None:
        self.log_path = Path(log_path)
        self.verbose = verbose
        self._saved_fd: int | None = None
        self._file: Any = None
        self._live: Any = None
        self._env: dict[str, str | None] = {}

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> Console:
        if not self.verbose:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.log_path, "ab", buffering=0)
            sys.stderr.flush()
            self._saved_fd = os.dup(2)
            os.dup2(self._file.fileno(), 2)  # this process and every child it starts
            for name, value in (("ADLOOP_LOG_JSON", "1"), ("TQDM_DISABLE", "1"),
                                ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
                self._env[name] = os.environ.get(name)
                os.environ[name] = value
            configure_logging(json=True)
        if sys.stdout.isatty():
            from rich.console import Console as RichConsole
            from rich.live import Live
            from rich.text import Text

            self._live = Live(Text(""), console=RichConsole(), transient=True,
                              refresh_per_second=4)
            self._live.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._saved_fd is not None:
            sys.stderr.flush()
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._saved_fd = None
            for name, value in self._env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            configure_logging()
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- output ----------------------------------------------------------------------------
    @property
    def quiet(self) -> bool:
        """True while logs go to the file instead of the terminal."""
        return self._saved_fd is not None

    def say(self, msg: str) -> None:
        """One permanent line (above the progress line)."""
        if self._live is not None:
            self._live.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            print(msg, flush=True)

    def progress(self, msg: str) -> None:
        """Replace the live progress line (a new line where there is no terminal)."""
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(msg, no_wrap=True, overflow="ellipsis"))
        else:
            print(msg, flush=True)
