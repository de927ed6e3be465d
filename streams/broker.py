"""The embedded Apache Kafka broker: a single KRaft node (broker + controller) on loopback.

The jars are the official ``org.apache.kafka:kafka_2.13`` release resolved by Maven
from ``deploy/kafka/pom.xml`` (``scripts/bootstrap`` puts them in a cache directory
and exports ``ADLOOP_KAFKA_LIBS``). This module only writes a ``server.properties``,
formats the storage once, starts ``kafka.Kafka`` with the machine's JDK, waits until
the broker answers metadata requests, and stops it with SIGTERM (controlled
shutdown), falling back to SIGKILL after a timeout.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.logs import get_logger
from streams.settings import cache_dir

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG4J_CONFIG = REPO_ROOT / "deploy" / "kafka" / "log4j2.properties"


class BrokerError(RuntimeError):
    """The embedded broker could not be set up, started or stopped."""


class BrokerSettings(BaseSettings):
    """Settings of ``adloop broker`` (env ``ADLOOP_BROKER_*``)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_BROKER_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on (loopback by default)")
    port: int = Field(9092, description="client (PLAINTEXT) port")
    controller_port: int = Field(0, description="KRaft controller port; 0 = port + 1")
    data_dir: Path = Field(default_factory=lambda: cache_dir() / "broker",
                           description="KRaft metadata and log segments")
    heap: str = Field("512m", description="JVM heap (-Xmx/-Xms)")
    kafka_libs: Path | None = Field(None, description="directory of broker jars "
                                    "(default: $ADLOOP_KAFKA_LIBS from scripts/bootstrap)")
    java: str = Field("java", description="the java executable (JDK 17+)")
    start_timeout_s: float = Field(90.0, description="how long to wait for readiness")
    stop_timeout_s: float = Field(30.0, description="how long to wait after SIGTERM")
    sasl_port: int = Field(0, description="also listen with SASL_PLAINTEXT (PLAIN) on this "
                           "port; 0 = off (for trying secured clients locally)")
    sasl_users: dict[str, SecretStr] = Field(
        default_factory=dict, description="PLAIN users of the SASL listener (name -> password)")
    initial_rebalance_delay_ms: int = Field(
        0, ge=0, description="how long a new consumer group waits for more members before "
        "its first assignment (Kafka's default is 3000; 0 lets test groups form at once)")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def kafka_libs_dir(explicit: Path | None = None) -> Path:
    """The directory holding the broker jars, or a clear error saying how to get it."""
    candidates = [explicit] if explicit else []
    env = os.environ.get("ADLOOP_KAFKA_LIBS")
    if env:
        candidates.append(Path(env))
    candidates.extend(sorted(cache_dir().glob("kafka-*/libs")))
    for path in candidates:
        if path and path.is_dir() and any(path.glob("kafka_2.13-*.jar")):
            return path
    raise BrokerError(
        "Apache Kafka jars not found: run scripts/bootstrap (needs Maven and a JDK 17+), "
        "or set ADLOOP_KAFKA_LIBS to a directory holding kafka_2.13-*.jar"
    )


def kafka_version(libs: Path) -> str:
    jars = sorted(libs.glob("kafka_2.13-*.jar"))
    if not jars:
        raise BrokerError(f"no kafka_2.13-*.jar in {libs}")
    return jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar")


class EmbeddedBroker:
    """One KRaft node on loopback. Use as a context manager or call start()/stop()."""

    def __init__(self, settings: BrokerSettings | None = None) -> None:
        self.settings = settings or BrokerSettings()
        if self.settings.port == 0:
            self.settings.port = _free_port(self.settings.host)
        if self.settings.controller_port == 0:
            cport = self.settings.port + 1
            self.settings.controller_port = cport if self._port_free(cport) else _free_port(
                self.settings.host)
        self.libs = kafka_libs_dir(self.settings.kafka_libs)
        self.version = kafka_version(self.libs)
        self.data_dir = Path(self.settings.data_dir)
        self.proc: subprocess.Popen[bytes] | None = None

    def _port_free(self, port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind((self.settings.host, port))
            except OSError:
                return False
            return True

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    # -- configuration ---------------------------------------------------------------
    def server_properties(self) -> str:
        s = self.settings
        logs = self.data_dir / "kraft-logs"
        listeners = f"PLAINTEXT://{s.host}:{s.port},CONTROLLER://{s.host}:{s.controller_port}"
        advertised = f"PLAINTEXT://{s.host}:{s.port}"
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        sasl: list[str] = []
        if s.sasl_port:
            listeners += f",SASL_PLAINTEXT://{s.host}:{s.sasl_port}"
            advertised += f",SASL_PLAINTEXT://{s.host}:{s.sasl_port}"
            protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            users = " ".join(f'user_{u}="{p.get_secret_value()}"'
                             for u, p in s.sasl_users.items())
            sasl = ["sasl.enabled.mechanisms=PLAIN",
                    "listener.name.sasl_plaintext.plain.sasl.jaas.config="
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"]
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{s.host}:{s.controller_port}",
            f"listeners={listeners}",
            f"advertised.listeners={advertised}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"listener.security.protocol.map={protocols}",
            *sasl,
            f"log.dirs={logs}",
            "num.partitions=1",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            f"group.initial.rebalance.delay.ms={s.initial_rebalance_delay_ms}",
            "log.segment.bytes=67108864",
            "log.retention.check.interval.ms=60000",
            "log.cleaner.backoff.ms=2000",
            "message.max.bytes=4194304",
            "num.network.threads=2",
            "num.io.threads=4",
            "",
        ])

    def _java_cmd(self, main: str, *args: str) -> list[str]:
        s = self.settings
        java = shutil.which(s.java) or s.java
        return [
            java, f"-Xmx{s.heap}", f"-Xms{s.heap}", "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
            "-cp", f"{self.libs}/*", main, *args,
        ]

    def _format(self, props: Path) -> None:
        meta = self.data_dir / "kraft-logs" / "meta.properties"
        if meta.exists():
            return
        cluster_id = "-"
        while cluster_id.startswith("-"):  # a leading dash would parse as a flag
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = self._java_cmd("kafka.tools.StorageTool", "format", "-t", cluster_id,
                             "-c", str(props))
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{res.stdout}\n{res.stderr}")
        log.info("broker.formatted", cluster_id=cluster_id, data_dir=str(self.data_dir))

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> EmbeddedBroker:
        if self.proc is not None:
            return self
        java = shutil.which(self.settings.java)
        if java is None:
            raise BrokerError(f"{self.settings.java!r} not found: install a JDK 17+")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        if self.pid_file.exists():
            pid = int(self.pid_file.read_text().strip() or 0)
            if pid and _alive(pid):
                raise BrokerError(f"a broker (pid {pid}) already runs on {self.data_dir}; "
                                  "stop it with `adloop broker --stop`")
        props = self.data_dir / "server.properties"
        props.write_text(self.server_properties())
        self._format(props)
        out = open(self.data_dir / "logs" / "stdout.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self._java_cmd("kafka.Kafka", str(props)),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        self.pid_file.write_text(str(self.proc.pid))
        log.info("broker.starting", pid=self.proc.pid, bootstrap=self.bootstrap_servers,
                 kafka_version=self.version)
        try:
            self.wait_ready(self.settings.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the broker answers a metadata request (or raise)."""
        from kafka.admin import KafkaAdminClient

        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"broker exited with {self.proc.returncode}; see "
                                  f"{self.data_dir / 'logs'}:\n{self._log_tail()}")
            if not _port_open(self.settings.host, self.settings.port):
                time.sleep(0.2)
                continue
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers,
                                         request_timeout_ms=3000, client_id="adloop-ready")
                try:
                    admin.describe_cluster()
                    admin.list_topics()
                finally:
                    admin.close()
                log.info("broker.ready", bootstrap=self.bootstrap_servers)
                return
            except Exception as exc:
                last = exc
                time.sleep(0.5)
        raise BrokerError(f"broker not ready after {timeout_s}s ({last}):\n{self._log_tail()}")

    def _log_tail(self, n: int = 30) -> str:
        path = self.data_dir / "logs" / "stdout.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (controlled shutdown), SIGKILL after ``stop_timeout_s``; ``kill`` = at once."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(self.settings.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("broker.kill", pid=proc.pid)
                proc.kill()
                proc.wait(10)
        self.pid_file.unlink(missing_ok=True)
        log.info("broker.stopped", returncode=proc.returncode)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_from_pid_file(data_dir: Path, timeout_s: float = 30.0) -> bool:
    """Stop a broker started by another process, found through its PID file."""
    pid_file = Path(data_dir) / "broker.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    if not pid or not _alive(pid):
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True
