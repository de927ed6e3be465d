"""Joiner throughput vs raw consume on the same broker, and with two instances.

Measurements in one run, each on its own topic prefix holding the same traffic
(impressions with a 3-ad slate, clicks on ~30 %, conversions on ~10 %, event time 0.1 s
apart, 256 users): raw kafka-python consume of the three input topics (bytes, no
decode; and, for context only, the same plus msgspec decoding of every record), one
``adloop join`` process, two ``adloop join`` processes in one group. Joiner rates count
input records from the first to the last one processed (each process's ``processed``
count on ``/readyz``, cheaper to poll than ``/metrics``), so start-up and the first group
join are not timed. The embedded broker here keeps Kafka's default initial rebalance delay
(3 s), so two instances started together form their group in one assignment (with the
test default of 0 the first would take every partition and a rebalance would follow when
the second arrives). Joiner CPU per record is read from ``/proc/<pid>/stat`` over the
same span.

    python bench/join.py [--quick] [--bootstrap-servers HOST:PORT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka import KafkaConsumer, TopicPartition

from bench.common import ROOT, device, markdown_table, update_doc_section, write_results
from streams.broker import BrokerSettings, EmbeddedBroker
from streams.joiner_core import INPUT_TOPICS, JoinCore, JoinSettings
from streams.kafka_io import EventProducer
from streams.schemas import Click, Conversion, Impression, SlateItem, decode, encode
from streams.settings import KafkaSettings
from streams.topics import EVENT_PARTITIONS, TOPICS, Topics, create_topics

DEPENDS = ("streams/", "adloop/__init__.py", "adloop/__main__.py", "adloop/cli.py",
           "deploy/kafka/", "bench/join.py")

INPUTS = ("impressions", "clicks", "conversions")
DEFAULT_GC = gc.get_threshold()
SLATE = [SlateItem(ad_id=f"a{j}", semantic_id=[1, j], position=j, score=0.5, bid=1.0 + j,
                   bid_type=("cpc", "cpa", "cpm")[j]) for j in range(3)]
JOIN_FLAGS = ["--observation-window-s", "30", "--attribution-window-s", "120",
              "--out-of-orderness-s", "5", "--session-timeout-s", "6"]


def traffic(n: int) -> Iterator[tuple[str, Impression | Click | Conversion]]:
    """Event-time ordered (logical topic, record) for ``n`` impressions."""
    for i in range(n):
        t, rid, u = i * 0.1, f"r{i}", f"u{i % 256}"
        yield "impressions", Impression(request_id=rid, event_time=t, user_id=u,
                                        slate=list(SLATE), model_version="m")
        if i % 10 < 3:
            yield "clicks", Click(event_id=f"c{i}", request_id=rid, user_id=u, ad_id="a0",
                                  event_time=t + 2)
        if i % 10 == 0:
            yield "conversions", Conversion(event_id=f"v{i}", request_id=rid, user_id=u,
                                            ad_id="a1", event_time=t + 40, value=2.0)


def produce(kafka: KafkaSettings, n: int) -> int:
    """The traffic through the keyed producer; returns the record count."""
    p = EventProducer(kafka)
    count = 0
    for topic, rec in traffic(n):
        p.send(topic, rec)
        count += 1
    p.flush()
    p.close()
    return count


def raw_consume(kafka: KafkaSettings, total: int) -> float:
    names = Topics(kafka.topic_prefix)
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False,
                      max_poll_records=2000, fetch_max_wait_ms=100)
    tps = [TopicPartition(names.name(t), p) for t in INPUTS for p in range(4)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    got, t0 = 0, time.perf_counter()
    while got < total:
        for msgs in c.poll(timeout_ms=500).values():
            got += len(msgs)
    dt = time.perf_counter() - t0
    c.close()
    return got / dt


def raw_consume_decode(kafka: KafkaSettings, total: int) -> float:
    """Context only: raw consume plus msgspec decoding of every record."""
    names = Topics(kafka.topic_prefix)
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False,
                      max_poll_records=2000, fetch_max_wait_ms=100)
    tps = [TopicPartition(names.name(t), p) for t in INPUTS for p in range(4)]
    types = {names.name(t): TOPICS[t].record for t in INPUTS}
    c.assign(tps)
    c.seek_to_beginning(*tps)
    got, t0 = 0, time.perf_counter()
    while got < total:
        for tp, msgs in c.poll(timeout_ms=500).items():
            record_type = types[tp.topic]
            for m in msgs:
                decode(m.value, record_type)
            got += len(msgs)
    dt = time.perf_counter() - t0
    c.close()
    return got / dt


def core_only_us_per_record(n: int, repeats: int = 3) -> float:
    """CPU µs per input record of the join logic alone, in this process, no Kafka: the
    same traffic (pre-encoded, split into the 4 partitions by user) through
    ``JoinCore.on_record`` with the emitted lists encoded and marked and the changed
    state encoded every 2,000 records, as the joiner does. Best of ``repeats``."""
    records = [(topic, int(rec.user_id[1:]) % EVENT_PARTITIONS, rec.user_id.encode(),
                encode(rec)) for topic, rec in traffic(n)]
    settings = JoinSettings(observation_window_s=30, attribution_window_s=120,
                            out_of_orderness_s=5)
    present = {topic for topic, _p, _k, _r in records}
    gc.set_threshold(50_000, 20, 20)   # as `adloop join` runs
    best = float("inf")
    for _ in range(repeats):
        core = JoinCore(settings, None)
        core.load_partitions(range(EVENT_PARTITIONS))
        # a topic the traffic has no records of (organic engagements) is read to its end
        caught = {t: t not in present for t in INPUT_TOPICS}
        offsets = [0] * EVENT_PARTITIONS
        t0 = time.thread_time()
        for k, (topic, p, key, raw) in enumerate(records):
            offsets[p] += 1
            step = core.on_record(topic, p, offsets[p], key, raw, caught)
            if step.emissions:
                for fb in step.emissions:
                    encode(fb)
                core.mark_emitted(p, step.emissions)
            if k % 2000 == 1999:
                core.take_changes()
        core.take_changes()
        best = min(best, time.thread_time() - t0)
    gc.set_threshold(*DEFAULT_GC)
    return best / len(records) * 1e6


def _readyz(url: str) -> dict[str, Any]:
    """The joiner's /readyz body (``processed`` input records, held ``partitions``): a
    cheap JSON, unlike /metrics, so polling it often does not slow the joiner down."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            body = r.read()
    except urllib.error.HTTPError as exc:  # 503 while not ready, same body
        body = exc.read()
    except OSError:
        return {}
    try:
        out: dict[str, Any] = json.loads(body.decode())
    except ValueError:
        return {}
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def joiner_rate(kafka: KafkaSettings, total: int, instances: int,
                logdir: Path) -> tuple[float, float]:
    """Start the joiners on the written traffic and time them from the first to the last
    record processed. Returns (records/s, joiner CPU microseconds per record)."""
    procs = []
    for k in range(instances):
        cmd = [sys.executable, "-m", "adloop", "join", "--bootstrap-servers",
               kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
               "--metrics-port", "0", *JOIN_FLAGS]
        log = open(logdir / f"join-{instances}-{k}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log))
    try:
        urls = []
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().decode()
            urls.append(line.split()[1])
        first = last = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = sum(float(_readyz(u).get("processed", 0)) for u in urls)
            now = time.perf_counter()
            cpu = sum(_cpu_s(p.pid) for p in procs)
            if done > 0 and first is None:
                first, first_done, first_cpu = now, done, cpu
            if done >= total:
                last = now
                break
            time.sleep(0.05)
        if first is None or last is None:
            raise RuntimeError(f"joiner did not finish ({instances} instances)")
        processed = total - first_done
        return processed / (last - first), (cpu - first_cpu) / processed * 1e6
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 impressions (default 60,000)")
    ap.add_argument("--bootstrap-servers", default=None, help="use a running broker")
    args = ap.parse_args()
    n = 20_000 if args.quick else 60_000
    broker = None
    bootstrap = args.bootstrap_servers
    tmp = Path(tempfile.mkdtemp(prefix="adloop-bench-join-"))
    load = round(os.getloadavg()[0], 2)
    if bootstrap is None:
        # Kafka's default initial rebalance delay: two joiners started together form
        # their group in one assignment instead of a rebalance when the second arrives
        broker = EmbeddedBroker(BrokerSettings(port=0, data_dir=tmp / "kafka", heap="768m",
                                               initial_rebalance_delay_ms=3000))
        broker.start()
        bootstrap = broker.bootstrap_servers
    try:
        runs: dict[str, float] = {}
        raw_runs: list[float] = []
        for name in ("raw", "one", "two"):
            prefix = f"bench-join-{name}-{uuid.uuid4().hex[:6]}."
            create_topics(bootstrap, prefix)
            kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)
            total = produce(kafka, n)
            if name == "raw":
                # the best of three (the first read of a fresh topic is the slowest): the
                # ratio is taken against the fastest raw read, never a slow outlier
                raw_runs = [raw_consume(kafka, total) for _ in range(3)]
                runs[name] = max(raw_runs)
                runs["raw_decode"] = raw_consume_decode(kafka, total)
                print(f"raw + decode: {runs['raw_decode']:,.0f} records/s", flush=True)
            else:
                runs[name], runs[f"{name}_cpu"] = joiner_rate(
                    kafka, total, 1 if name == "one" else 2, tmp)
                print(f"{name}: {runs[f'{name}_cpu']:.1f} CPU us per record", flush=True)
            print(f"{name}: {runs[name]:,.0f} records/s ({total} records)", flush=True)
    finally:
        if broker is not None:
            broker.stop()
    core_us = core_only_us_per_record(n)
    print(f"join logic alone: {core_us:.1f} CPU us per record", flush=True)
    results: dict[str, Any] = {
        "impressions": n, "records": total,
        "raw_consume_events_per_s": round(runs["raw"]),
        "raw_consume_runs_events_per_s": [round(r) for r in raw_runs],
        "raw_consume_decode_events_per_s": round(runs["raw_decode"]),
        "join_events_per_s": round(runs["one"]),
        "ratio": round(runs["one"] / runs["raw"], 3),
        "two_instance_events_per_s": round(runs["two"]),
        "two_instance_speedup": round(runs["two"] / runs["one"], 3),
        "join_cpu_us_per_record": round(runs["one_cpu"], 1),
        "two_instance_cpu_us_per_record": round(runs["two_cpu"], 1),
        "join_logic_only_cpu_us_per_record": round(core_us, 1),
        "raw_consume_us_per_record": round(1e6 / runs["raw"], 1),
        "load_average_1m": load,
        "device": device(),
    }
    path = write_results("join", results, DEPENDS)
    table = markdown_table(["path", "input records/s"], [
        ["raw kafka-python consume of the 3 inputs (bytes, no decode, no group; best of 3)",
         float(results["raw_consume_events_per_s"])],
        ["(context) the same + msgspec decode of every record",
         float(results["raw_consume_decode_events_per_s"])],
        ["`adloop join`, 1 instance", float(results["join_events_per_s"])],
        ["`adloop join`, 2 instances in one group", float(results["two_instance_events_per_s"])],
        ["1 instance / raw (goal >= 0.5)", float(results["ratio"])],
        ["2 instances / 1 instance", float(results["two_instance_speedup"])],
        ["joiner CPU per input record, 1 instance (µs, all threads)",
         float(results["join_cpu_us_per_record"])],
        ["join logic alone per input record, in-process, no Kafka (CPU µs)",
         float(results["join_logic_only_cpu_us_per_record"])],
        ["raw consume per input record (wall µs, best run)",
         float(results["raw_consume_us_per_record"])],
    ])
    update_doc_section("join", (
        f"`bench/join.py{' --quick' if args.quick else ''}`: {n:,} impressions "
        f"({total:,} input records: impressions, clicks, conversions), 4 partitions, "
        f"Apache Kafka embedded on loopback, {device()}, 1-minute load average {load} at "
        f"the start (the machine was shared: compare the rows of one run, not runs). Each "
        f"joiner run starts on its own copy of the traffic; rates are timed from the first "
        f"to the last record processed; two instances started together form their group "
        f"in one assignment (the broker keeps Kafka's default initial rebalance delay)."
        f"\n\n{table}\n\nPer input record the joiner decodes it, updates the request "
        f"state and emits about 1.4 feedback lists (provisional, final, corrections), each "
        f"encoded and produced with acks=all, plus the changed state keys once per commit; "
        f"raw consume only reads bytes. Producing goes through aiokafka's C record-batch "
        f"builder on a background thread (kafka-python's `send` alone managed about 15,000 "
        f"records/s on this machine, less than the lists the joiner emits); what is left is "
        f"Python work in one process (GIL): kafka-python's own record parsing (the whole "
        f"raw-consume cost), building and encoding the lists, and the join state, so more "
        f"instances help as far as there are free cores, not the broker: on 2 cores the "
        f"second instance shares them with the first and with the broker. For the ratio "
        f"goal (0.5) everything the joiner does besides reading would have to fit in the "
        f"time the raw read takes ({results['raw_consume_us_per_record']:.0f} µs per record "
        f"here); the join logic alone (decode, state, lists and state encoded; no Kafka at "
        f"all) takes {results['join_logic_only_cpu_us_per_record']:.0f} µs."))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
