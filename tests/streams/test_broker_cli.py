"""``adloop broker --detach`` starts a real broker that ``adloop broker --stop`` stops."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from kafka.admin import KafkaAdminClient

from streams.broker import BrokerSettings, EmbeddedBroker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_broker_cli_detach_then_stop_via_pid_file(tmp_path: Path) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "adloop", "broker", "--port", str(port),
           "--data-dir", str(tmp_path), "--heap", "256m"]
    env = dict(os.environ, ADLOOP_LOG_JSON="1")
    out = subprocess.run([*cmd, "--detach"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert f"127.0.0.1:{port}" in out.stdout and "Apache Kafka 4." in out.stdout
    pid = int((tmp_path / "broker.pid").read_text())
    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
    assert admin.list_topics() == [] or isinstance(admin.list_topics(), list)
    admin.close()
    stop = subprocess.run([*cmd, "--stop"], capture_output=True, text=True, timeout=60, env=env)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not (tmp_path / "broker.pid").exists()
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_initial_rebalance_delay_goes_into_server_properties(tmp_path: Path) -> None:
    """0 by default (test groups form at once); Kafka's 3000 ms on request (benchmarks,
    so that consumers started together share the first assignment)."""
    default = EmbeddedBroker(BrokerSettings(port=19092, data_dir=tmp_path / "a"))
    assert "group.initial.rebalance.delay.ms=0\n" in default.server_properties()
    delayed = EmbeddedBroker(BrokerSettings(port=19092, data_dir=tmp_path / "b",
                                            initial_rebalance_delay_ms=3000))
    assert "group.initial.rebalance.delay.ms=3000\n" in delayed.server_properties()
