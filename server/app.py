"""``adloop serve``: the serving worker's entry point (FastAPI on uvicorn).

``create_app(settings, kafka)`` builds the ASGI app (used by tests and the benchmark);
``configure`` / ``run`` are what ``adloop.cli`` calls. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from server.settings import ServerSettings
from streams.settings import KafkaSettings, add_settings_arguments, settings_from_args


def create_app(settings: ServerSettings | None = None,
               kafka: KafkaSettings | None = None) -> FastAPI:
    from server.api import create_api
    from server.service import Service

    return create_api(Service(settings or ServerSettings(), kafka or KafkaSettings()))


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, ServerSettings)
    add_settings_arguments(parser, KafkaSettings)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(ServerSettings, args)
    kafka = settings_from_args(KafkaSettings, args)
    app = create_app(settings, kafka)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=10)
    _GracefulServer(config).run()
    return 0


class _GracefulServer(uvicorn.Server):
    """SIGTERM / SIGINT shut down gracefully and the process exits 0 (uvicorn's own
    handler re-raises the signal after shutdown, which reads as a kill)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
