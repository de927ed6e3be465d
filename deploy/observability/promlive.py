"""Check the dashboards and rules against a real Prometheus scraping a running stack.

Used by ``tests/observability/test_live_prometheus.py`` and ``bench/observability.py``:

1. :func:`start_stack_processes` starts the processes named in
   :data:`LIVE_PROCESSES` on a :class:`adloop.stack.LocalStack` (embedded broker),
   each with its metrics on a free loopback port;
2. :class:`PrometheusServer` runs Debian's ``prometheus`` binary (never the system
   service) on loopback with a temporary data dir and the config of
   ``deploy/prometheus/prometheus.embedded.yml`` rendered with the live ports, a 1 s
   scrape interval and the repository's rule files;
3. :func:`evaluate` runs every dashboard panel query and every recording rule
   through ``/api/v1/query``: a query error always fails; an empty result fails when
   the processes whose metrics the query reads are running (unless the query is
   marked as allowed to be empty), and is skipped with a reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from adloop.stack import LocalStack, ManagedProcess, free_port
from deploy.observability.dashboards import panel_queries, processes_needed, recording_rules

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.embedded.yml"
RULES_GLOB = ROOT / "deploy" / "prometheus" / "rules" / "*.yml"


# --------------------------------------------------------------------------------------
# The processes the live check starts.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSpec:
    """How to start one process of the stack with its metrics on ``port``."""

    job: str
    """Prometheus job name (the same as in prometheus.embedded.yml / compose)."""
    provides: str
    """The inventory process whose metrics it exposes (see inventory.Metric.process)."""
    argv: Callable[[LocalStack, dict[str, int]], list[str]]
    """Arguments, given the stack and every process's port (by spec name)."""
    module: str = "adloop"
    dumps_stacks: bool = False
    """Writes its threads' stacks to its log on SIGUSR1: asked for when it is not ready
    in time, so the error shows where it waits."""


def _kafka_loop_argv(stack: LocalStack, ports: dict[str, int]) -> list[str]:
    # Its own topics (the loop's prefix + "kafka-loop."), so it never feeds the joiner.
    return ["--bootstrap-servers", stack.kafka.bootstrap_servers,
            "--topic-prefix", f"{stack.topic_prefix}kafka-loop.",
            "--metrics-port", str(ports["kafka-loop"])]


SPECS: dict[str, ProcessSpec] = {
    # Real Kafka traffic through the shared helpers: produced/consumed/dead letters/lag.
    "kafka-loop": ProcessSpec("adloop-kafka-loop", "all", _kafka_loop_argv,
                              module="deploy.observability.kafka_loop", dumps_stacks=True),
    # The loop's processes, with the flags compose.yaml passes them.
    "join": ProcessSpec("adloop-join", "join", lambda s, p: [
        "join", *s.kafka_args(), "--metrics-port", str(p["join"])]),
    "stats": ProcessSpec("adloop-stats", "stats", lambda s, p: [
        "stats", *s.kafka_args(), "--metrics-port", str(p["stats"]),
        "--data-dir", str(s.run_dir / "stats")]),
    # learn expects a pretrained run in <run dir>/pretrain (what `adloop demo` prepares).
    "learn": ProcessSpec("adloop-learn", "learn", lambda s, p: [
        "learn", *s.kafka_args(), "--metrics-port", str(p["learn"]),
        "--init-run-dir", str(s.run_dir / "pretrain"), "--state-dir", str(s.run_dir / "learner"),
        "--snapshot-store", str(s.run_dir / "snapshots"), "--batch-lists", "16",
        "--max-wait-s", "0.5", "--snapshot-every-s", "5", "--threads", "1"]),
    "serve": ProcessSpec("adloop-serve", "server", lambda s, p: [
        "serve", *s.kafka_args(), "--host", "127.0.0.1", "--port", str(p["serve"]),
        "--server-id", "serve-1", "--cache-dir", str(s.run_dir / "serve-cache"),
        "--snapshot-bases", str(s.run_dir / "snapshots")]),
    "replay": ProcessSpec("adloop-replay", "replay", lambda s, p: [
        "replay", *s.kafka_args(), "--metrics-port", str(p["replay"]),
        *(["--rate", "5", "--speed", "60"] if "serve" in p else ["--rate", "0.5", "--speed", "30"]),
        # without a server in the stack, the simulator's in-process random policy answers
        *(["--server-url", f"http://127.0.0.1:{p['serve']}"] if "serve" in p
          else ["--policy", "random"])]),
}

LIVE_PROCESSES: tuple[str, ...] = ("kafka-loop", "join", "stats", "learn", "serve", "replay")
"""What the live check starts: the whole loop plus the Kafka workload."""


def pretrain_for_replay(run_dir: Path) -> Path:
    """A small pretrained run over the ads of the replay's simulated world (its default
    seed and size), so the learner can start and the server serves the world's ads."""
    from adloop.evaluation import EvalConfig, logging_phase
    from learner.pretrain import PretrainSettings, pretrain
    from traffic.world import World, WorldConfig

    world = World(WorldConfig())
    logs = logging_phase(world, EvalConfig(log_requests=600), 0)
    out = run_dir / "pretrain"
    pretrain(PretrainSettings(run_dir=out, encoder="hashing", steps=20, level_sizes="16,8",
                              history_len=10, batch_size=64, progress=False,
                              checkpoint_every=0, resume=False),
             [a.record for a in world.ads.values()], logs)
    return out


@dataclass
class LiveStack:
    stack: LocalStack
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def targets(self) -> dict[str, list[str]]:
        """Prometheus job -> ``host:port`` targets."""
        out: dict[str, list[str]] = {}
        for name, port in self.ports.items():
            out.setdefault(SPECS[name].job, []).append(f"127.0.0.1:{port}")
        return out

    def provides(self) -> set[str]:
        """Inventory processes whose metrics the running stack exposes."""
        return {"all"} | {SPECS[n].provides for n in self.processes}

    def metrics_urls(self) -> dict[str, str]:
        return {n: f"http://127.0.0.1:{p}/metrics" for n, p in self.ports.items()}


def start_stack_processes(stack: LocalStack, names: Sequence[str] = LIVE_PROCESSES,
                          ready_timeout_s: float = 180.0) -> LiveStack:
    """Start ``names`` on ``stack`` (broker already up) and wait until each is ready."""
    live = LiveStack(stack, ports={n: free_port() for n in names})
    if "learn" in names and not (stack.run_dir / "pretrain" / "checkpoint.pt").exists():
        pretrain_for_replay(stack.run_dir)
    env = {"PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    for name in names:
        spec = SPECS[name]
        port = live.ports[name]
        proc = stack.add(name, [], ready_url=f"http://127.0.0.1:{port}/readyz", env=env)
        proc.argv = [sys.executable, "-m", spec.module, *spec.argv(stack, live.ports)]
        proc.dumps_stacks = spec.dumps_stacks
        live.processes[name] = proc.start()
    for proc in live.processes.values():
        proc.wait_ready(ready_timeout_s)
    return live


# --------------------------------------------------------------------------------------
# Prometheus.
# --------------------------------------------------------------------------------------


class PromQueryError(RuntimeError):
    """Prometheus answered a query with an error."""


def render_config(targets: dict[str, list[str]], scrape_interval: str = "1s",
                  rule_files: Iterable[str] = (str(RULES_GLOB),)) -> dict[str, Any]:
    """prometheus.embedded.yml with the live targets, interval and absolute rule paths.

    Jobs of the committed file keep their settings and get the live targets; jobs
    with no live target are dropped; new jobs are added in the same shape.
    """
    base: dict[str, Any] = yaml.safe_load(EMBEDDED_CONFIG.read_text())
    base["global"]["scrape_interval"] = scrape_interval
    base["global"]["evaluation_interval"] = scrape_interval
    base["rule_files"] = list(rule_files)
    committed = {j["job_name"]: j for j in base["scrape_configs"]}
    jobs = []
    for job, addrs in targets.items():
        cfg = dict(committed.get(job, {"job_name": job}))
        cfg["static_configs"] = [{"targets": list(addrs)}]
        jobs.append(cfg)
    base["scrape_configs"] = jobs
    return base


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusServer:
    """Our own ``prometheus`` on loopback with a throw-away data dir."""

    def __init__(self, config: dict[str, Any], workdir: Path, port: int = 0) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "prometheus.log"
        self.config_path = self.workdir / "prometheus.yml"
        self._http = httpx.Client(base_url=self.url, timeout=10.0)

    def start(self, timeout_s: float = 60.0) -> PrometheusServer:
        exe = prometheus_binary()
        if exe is None:
            raise FileNotFoundError("prometheus is not on PATH (scripts/bootstrap installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1d", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if self._http.get("/-/ready").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        self._http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # -- HTTP API ----------------------------------------------------------------------
    def _get(self, path: str, **params: Any) -> Any:
        resp = self._http.get(path, params=params)
        try:
            body = resp.json()
        except ValueError as exc:
            raise PromQueryError(f"{path}: HTTP {resp.status_code}: {resp.text[:200]}") from exc
        if body.get("status") != "success":
            raise PromQueryError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the result vector (or a one-element list for a scalar)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._get("/api/v1/query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float,
                    step: float) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return active

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        active: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return active

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._get("/api/v1/rules")["groups"]
        return groups

    def wait_targets_up(self, jobs: Iterable[str], timeout_s: float = 60.0) -> None:
        want = set(jobs)
        deadline = time.monotonic() + timeout_s
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            state = {t["labels"]["job"]: t["health"] for t in self.targets()}
            if want <= {j for j, h in state.items() if h == "up"}:
                return
            time.sleep(0.5)
        raise TimeoutError(f"targets not up after {timeout_s}s: {state}")

    def wait_for(self, expr: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns a non-empty result."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise TimeoutError(f"no result for {expr!r} after {timeout_s}s")


# --------------------------------------------------------------------------------------
# Evaluating the dashboards and rules.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryResult:
    kind: str
    """"panel" or "recording_rule"."""
    id: str
    expr: str
    status: str
    """ok, empty_allowed, skipped, empty (a failure) or error (a failure)."""
    series: int = 0
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("error", "empty")


def _evaluate_one(prom: PrometheusServer, kind: str, ident: str, expr: str,
                  may_be_empty: bool, provides: set[str]) -> QueryResult:
    try:
        result = prom.query(expr)
    except (PromQueryError, httpx.HTTPError) as exc:
        return QueryResult(kind, ident, expr, "error", reason=str(exc))
    if result:
        return QueryResult(kind, ident, expr, "ok", len(result))
    missing = sorted(processes_needed(expr) - provides)
    if missing:
        return QueryResult(kind, ident, expr, "skipped",
                           reason=f"needs metrics of {', '.join(missing)} (not started)")
    if may_be_empty:
        return QueryResult(kind, ident, expr, "empty_allowed",
                           reason="no series yet; allowed (errors / rare events)")
    return QueryResult(kind, ident, expr, "empty",
                       reason="empty although every process it reads is running")


def evaluate(prom: PrometheusServer, provides: set[str], settle_s: float = 90.0,
             ) -> list[QueryResult]:
    """Every recording rule (by its recorded name) and every panel query.

    A query that is empty although its processes run is retried for up to
    ``settle_s``: a fresh stack needs a while before, say, the first feedback list
    closes its observation window.
    """
    specs = [("recording_rule", r.record, r.record, r.may_be_empty) for r in recording_rules()]
    specs += [("panel", pq.id, pq.expr, pq.may_be_empty) for pq in panel_queries()]
    results = {s[1]: _evaluate_one(prom, *s, provides) for s in specs}
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        waiting = [s for s in specs if results[s[1]].status in ("empty", "empty_allowed")]
        if not any(results[s[1]].status == "empty" for s in waiting):
            break
        time.sleep(2)
        for s in waiting:
            results[s[1]] = _evaluate_one(prom, *s, provides)
    return [results[s[1]] for s in specs]


def rule_health(prom: PrometheusServer) -> list[tuple[str, str, str]]:
    """(rule name, health, last error) of every loaded rule."""
    return [(r["name"], r["health"], r.get("lastError", ""))
            for g in prom.rule_groups() for r in g["rules"]]


def promtool_check_metrics(body: str) -> tuple[bool, str]:
    """``promtool check metrics`` on one exposition; (clean, promtool's output)."""
    exe = shutil.which("promtool")
    if exe is None:
        raise FileNotFoundError("promtool is not on PATH (scripts/bootstrap installs it)")
    res = subprocess.run([exe, "check", "metrics"], input=body.encode(), capture_output=True,
                         timeout=30)
    return res.returncode == 0, (res.stdout + res.stderr).decode(errors="replace")


PROMTOOL_TESTS = ROOT / "deploy" / "prometheus" / "tests"


def alert_test_coverage() -> dict[str, dict[str, int]]:
    """alert name -> how many firing / not-firing cases the promtool unit tests have."""
    from deploy.observability.dashboards import ALERTS

    cover = {a.name: {"firing": 0, "not_firing": 0} for a in ALERTS}
    for path in sorted(PROMTOOL_TESTS.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                key = "firing" if case.get("exp_alerts") else "not_firing"
                cover.setdefault(case["alertname"], {"firing": 0, "not_firing": 0})[key] += 1
    return cover


def promtool_test_rules() -> tuple[bool, str]:
    """``promtool test rules deploy/prometheus/tests/*.yml``; (passed, output)."""
    exe = shutil.which("promtool")
    if exe is None:
        raise FileNotFoundError("promtool is not on PATH (scripts/bootstrap installs it)")
    files = [str(p) for p in sorted(PROMTOOL_TESTS.glob("*.yml"))]
    res = subprocess.run([exe, "test", "rules", *files], capture_output=True, timeout=300)
    return res.returncode == 0, (res.stdout + res.stderr).decode(errors="replace")
