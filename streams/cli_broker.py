"""``adloop broker``: run the embedded Apache Kafka broker until SIGTERM / Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading

from streams.broker import BrokerSettings, EmbeddedBroker, stop_from_pid_file
from streams.logs import get_logger
from streams.settings import add_settings_arguments, settings_from_args

log = get_logger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, BrokerSettings)
    parser.add_argument("--stop", action="store_true",
                        help="stop the broker recorded in DATA_DIR/broker.pid and exit")
    parser.add_argument("--detach", action="store_true",
                        help="start, wait until ready, print the bootstrap address and exit "
                             "(stop later with --stop)")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(BrokerSettings, args)
    if args.stop:
        stopped = stop_from_pid_file(settings.data_dir, settings.stop_timeout_s)
        print("stopped" if stopped else f"no running broker recorded in {settings.data_dir}")
        return 0
    broker = EmbeddedBroker(settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("broker.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    broker.start()
    print(f"Apache Kafka {broker.version} ready on {broker.bootstrap_servers} "
          f"(pid {broker.proc.pid if broker.proc else '?'}, data {broker.data_dir})", flush=True)
    if args.detach:
        broker.proc = None  # leave it running; the PID file lets --stop find it
        return 0
    try:
        while not stop.wait(1.0):
            if broker.proc is not None and broker.proc.poll() is not None:
                log.error("broker.exited", returncode=broker.proc.returncode)
                return 1
    finally:
        broker.stop()
    return 0
