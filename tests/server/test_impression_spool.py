"""Served impressions survive ``kill -9`` of the server: the local spool."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from adloop.stack import ManagedProcess, free_port
from server.impressions import ImpressionSpool, SpoolInUseError
from streams.kafka_io import read_all
from streams.schemas import Impression, SlateItem
from streams.settings import KafkaSettings
from tests.server.conftest import Builder, publish_ads, wait_for
from tests.server.test_http import REQ, Send, _closed_port


def _impression(i: int) -> Impression:
    return Impression(request_id=f"r{i}", event_time=float(i), user_id="u", model_version="v1",
                      slate=[SlateItem(ad_id="a", semantic_id=[1], position=0, score=0.1,
                                       bid=1.0, bid_type="cpc")])


def test_spool_deletes_acknowledged_segments_and_hands_leftovers_to_the_next_process(
        tmp_path: Path) -> None:
    spool = ImpressionSpool(tmp_path)
    seqs = [spool.append(_impression(i)) for i in range(5)]
    with pytest.raises(SpoolInUseError, match="in use by another server"):
        ImpressionSpool(tmp_path)
    for seq in seqs[:3]:
        spool.resolved(seq)
    spool.close()          # the segment is closed with 2 of 5 records unacknowledged
    assert spool.segments == 1
    again = ImpressionSpool(tmp_path)
    left = again.leftovers()
    # the whole segment comes back (acknowledged ones again: the joiner dedups by request id)
    assert [r.request_id for _, r in left] == [f"r{i}" for i in range(5)]
    for seq, _ in left:
        again.resolved(seq)
    assert again.segments == 0 and not list(tmp_path.glob("*.jsonl"))
    again.close()


def test_spool_skips_a_torn_last_line(tmp_path: Path) -> None:
    spool = ImpressionSpool(tmp_path)
    spool.append(_impression(0))
    spool.close()
    seg = next(tmp_path.glob("*.jsonl"))
    seg.write_bytes(seg.read_bytes() + b'{"schema":1,"request_id":"r1","ev')   # died mid-write
    left = ImpressionSpool(tmp_path).leftovers()
    assert [r.request_id for _, r in left] == ["r0"]


def test_spool_skips_lines_of_any_bytes_and_keeps_the_good_ones(tmp_path: Path) -> None:
    spool = ImpressionSpool(tmp_path)
    spool.append(_impression(0))
    spool.close()
    seg = next(tmp_path.glob("*.jsonl"))
    junk = [b'"\x80"', b'{"\x80":1}', b"[" * 100_000, b"\xef\xbb\xbf{}", b"\x00\xff"]
    good = seg.read_bytes()
    seg.write_bytes(b"\n".join(junk) + b"\n" + good + good.replace(b'"r0"', b'"r1"'))
    left = ImpressionSpool(tmp_path).leftovers()
    assert [r.request_id for _, r in left] == ["r0", "r1"]


@pytest.mark.kafka
def test_impressions_served_before_a_kill_9_reach_kafka_after_the_restart(
        tmp_path: Path, kafka: KafkaSettings, snapshots: Builder,
        producer: Send) -> None:
    publish_ads(producer)
    snap = snapshots("v1").directory
    port = free_port()
    spool = tmp_path / "spool"

    def server(bootstrap: str, name: str) -> ManagedProcess:
        return ManagedProcess(name, [
            "serve", "--bootstrap-servers", bootstrap, "--topic-prefix", kafka.topic_prefix,
            "--port", str(port), "--snapshot", str(snap), "--cache-dir", str(tmp_path / "cache"),
            "--impression-spool-dir", str(spool), "--intra-op-threads", "1",
            "--beam-schedule", "8,8,8"], tmp_path / "logs",
            ready_url=f"http://127.0.0.1:{port}/healthz")

    # Kafka unreachable: every served impression waits in the spool
    down = server(f"127.0.0.1:{_closed_port()}", "serve-kafka-down").start().wait_ready(120)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for i in range(25):
                r = c.post("/v1/recommend", json={**REQ, "request_id": f"req-{i}"})
                assert r.status_code == 200, r.text
        assert list(spool.glob("*.jsonl"))
    finally:
        down.kill()
    up = server(kafka.bootstrap_servers, "serve").start().wait_ready(120)
    try:
        got = wait_for(lambda: {r.record.request_id for r in read_all(
            kafka, "impressions", timeout_s=5) if isinstance(r.record, Impression)}
            >= {f"req-{i}" for i in range(25)}, timeout_s=60, what="spooled impressions")
        assert got
        wait_for(lambda: not list(spool.glob("*.jsonl")), timeout_s=30,
                 what="the acknowledged segment deleted")
        assert "adloop_server_impressions_replayed_total 25.0" in httpx.get(
            f"http://127.0.0.1:{port}/metrics").text
    finally:
        assert up.stop() == 0
