"""Fixtures that start real services for the observability tests.

``live_stack``: the processes of ``deploy.observability.promlive.LIVE_PROCESSES``
running on the session's Kafka broker (own topic prefix), metrics on free ports.
``prometheus_server(targets)``: Debian's ``prometheus`` binary on loopback with a
temporary data dir, scraping ``targets`` every second with the repository's rules.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adloop.stack import LocalStack
from deploy.observability.promlive import (
    LiveStack,
    PrometheusServer,
    render_config,
    start_stack_processes,
)


def require_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is installed by scripts/bootstrap; it is missing from PATH")
    return exe


@pytest.fixture(scope="module")
def live_stack(kafka_broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    run_dir = Path(tmp_path_factory.mktemp("live-stack"))
    stack = LocalStack(run_dir, bootstrap_servers=kafka_broker,
                       topic_prefix=f"obs-{uuid.uuid4().hex[:6]}.")
    stack.start_broker()  # an external broker: only creates the prefixed topics
    try:
        yield start_stack_processes(stack)
    finally:
        stack.stop()


PrometheusFactory = Callable[[dict[str, list[str]]], PrometheusServer]


@pytest.fixture(scope="module")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """``prometheus_server(targets)`` -> a started Prometheus scraping ``{job: [host:port]}``."""
    require_tool("prometheus")
    started: list[PrometheusServer] = []

    def start(targets: dict[str, list[str]]) -> PrometheusServer:
        workdir = Path(tmp_path_factory.mktemp("prometheus"))
        prom = PrometheusServer(render_config(targets, scrape_interval="1s"), workdir)
        started.append(prom.start())
        prom.wait_targets_up(targets, timeout_s=60)
        return prom

    yield start
    for prom in started:
        prom.stop()
