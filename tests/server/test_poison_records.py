"""Poison bytes on ``ads`` and ``model-updates`` never stop the server's followers: each bad
record is skipped, dead-lettered once per offset (not again after a restart), and a
snapshot published after the poison is still loaded."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from kafka import KafkaConsumer
from kafka.structs import TopicPartition
from prometheus_client import REGISTRY

from server.follow import TopicFollower
from streams.kafka_io import DeadLetterOnce, EventProducer, read_all
from streams.schemas import Ad, DeadLetter, Event
from streams.settings import KafkaSettings
from streams.topics import Topics
from tests.server.conftest import AD_IDS, metric_value, publish_ads, ready, wait_for
from tests.support.snapshots import BuiltSnapshot, ServerThread

Builder = Callable[..., BuiltSnapshot]
Send = Callable[[str, Event], None]
Start = Callable[..., ServerThread]

DEEP = b"[" * 100_000


def _send_raw(kafka: KafkaSettings, topic: str, items: list[tuple[bytes | None, bytes | None]]
              ) -> list[int]:
    """Produce raw (key, value) pairs in order; their offsets."""
    prod = EventProducer(kafka)
    try:
        return [prod.send_bytes(topic, value, key).get(timeout=30).offset  # type: ignore[arg-type]
                for key, value in items]
    finally:
        prod.close()


def _retries() -> float:
    return sum(REGISTRY.get_sample_value("adloop_follow_retries_total", {"topic": t}) or 0.0
               for t in ("ads", "model-updates"))


def _bad_records() -> float:
    """``adloop_server_bad_records_total`` of this process, every topic and reason."""
    return sum(s.value for m in REGISTRY.collect() if m.name == "adloop_server_bad_records"
               for s in m.samples if s.name.endswith("_total"))


def _letters(kafka: KafkaSettings, logical: str) -> list[DeadLetter]:
    physical = Topics(kafka.topic_prefix).name(logical)
    return [r.record for r in read_all(kafka, "dlq", timeout_s=10)
            if r.record.source_topic == physical]


def test_poison_on_ads_and_model_updates_is_dead_lettered_once_and_serving_goes_on(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send,
        tmp_path: Path) -> None:
    # before the server starts: poison first, then the good records
    ads_bad = _send_raw(kafka, "ads", [(b"ad-x", b'"\x80"'), (b"\xff\xfe", b'{"\xc3":1}'),
                                       (b"ad-y", DEEP)])
    upd_bad = _send_raw(kafka, "model-updates", [(b"adloop", b'"\x80"'),
                                                 (b"\xff\xfe", DEEP),
                                                 (b"adloop", b'{"schema":7}'),
                                                 (b"\xc0tomb", None)])
    publish_ads(producer)
    producer("model-updates", snapshots("v1", data_watermark=10.0).model_update())
    retries_before = _retries()
    bases = f"{(tmp_path / 'store').as_uri()},s3://no-such-bucket"
    srv = start_server(kafka, snapshot_bases=bases)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v1"), what="v1 served past the poison")
        wait_for(lambda: c.get("/readyz").json()["servable_ads"] == len(AD_IDS),
                 what="every good ad read past the poison")
        # while following: poison again (an ad tombstone with a non-UTF-8 key, a model
        # update whose store cannot be opened), then a newer snapshot
        more = _send_raw(kafka, "model-updates", [(b"adloop", b"\xef\xbb\xbf{}")])
        _send_raw(kafka, "ads", [(b"\x80\x81", None)])
        s3 = snapshots("v2", data_watermark=20.0).model_update(uri="s3://no-such-bucket/v2")
        producer("model-updates", s3)
        producer("model-updates", snapshots("v3", data_watermark=30.0).model_update())
        wait_for(lambda: ready(c, "v3"), what="v3 served after poison while following")
        text = c.get("/metrics").text
        assert metric_value(text, "adloop_server_bad_records_total",
                            'reason="not_json",topic="model-updates"') >= 3
        assert metric_value(text, "adloop_server_bad_records_total",
                            'reason="not_json",topic="ads"') >= 3
        assert metric_value(text, "adloop_server_swaps_total", 'result="fetch"') >= 1
        assert _retries() == retries_before  # poison is skipped, never retried

    expected = {("ads", o): "not_json" for o in ads_bad}
    expected |= {("model-updates", o): "not_json" for o in upd_bad[:2] + more}
    expected[("model-updates", upd_bad[2])] = "schema_version"
    expected[("model-updates", upd_bad[3])] = "invalid"  # a tombstone: the learner sends none

    def letters() -> dict[tuple[str, int], str]:
        got = {}
        for logical in ("ads", "model-updates"):
            for d in _letters(kafka, logical):
                assert (logical, d.offset) not in got, f"dead-lettered twice: {d}"
                got[(logical, d.offset)] = d.reason
        return got

    wait_for(lambda: letters() == expected, timeout_s=30, what="one dead letter per offset")
    by_offset = {d.offset: d for d in _letters(kafka, "model-updates")}
    assert by_offset[upd_bad[0]].raw() == b'"\x80"'
    assert by_offset[upd_bad[1]].key_b64 is not None  # the garbage key is kept, base64

    # a second replica (or a restart) re-reads both topics from offset 0: nothing new in dlq
    bad_before = _bad_records()
    again = start_server(kafka, cache_dir=tmp_path / "replica-2", snapshot_bases=bases)
    with httpx.Client(base_url=again.url, timeout=30) as c:
        # ready with v3 (the last record of model-updates) and the catalogue caught up:
        # both followers have read past every poison record, and each one's dead letter
        # decision was made on the follower's thread before it went on
        wait_for(lambda: ready(c, "v3") and c.get("/readyz").json()["catalog_caught_up"],
                 what="the restarted server serves v3, its catalogue caught up")
    assert _bad_records() - bad_before == len(expected)   # it did meet each one again
    assert letters() == expected


def test_a_record_whose_handler_raises_is_skipped_and_the_follower_goes_on(
        kafka: KafkaSettings, producer: Send) -> None:
    ads = publish_ads(producer, ["ad-0", "boom", "ad-2"])
    seen: list[str] = []
    done = threading.Event()

    def handle(batch: list[tuple[bytes | None, Any]]) -> None:
        for _key, rec in batch:
            assert isinstance(rec, Ad)
            if rec.ad_id == "boom":
                raise ValueError("cannot place ad boom")
        seen.extend(rec.ad_id for _key, rec in batch)
        if "ad-2" in seen:
            done.set()

    follower = TopicFollower(kafka, "ads", handle,
                             dead_letters=DeadLetterOnce(kafka, "test-dead-letters")).start()
    try:
        assert done.wait(30), seen
        assert follower.caught_up.wait(10)
    finally:
        follower.stop()
    assert seen == ["ad-0", "ad-2"] and follower.skipped == 1
    letters = _letters(kafka, "ads")
    assert [(d.reason, "cannot place ad boom" in d.detail) for d in letters] == [
        ("handler_error", True)]
    assert letters[0].offset == 1 and len(ads) == 3
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id="test-dead-letters")
    try:  # the once-per-offset mark is past the dead-lettered record
        assert c.committed(TopicPartition(Topics(kafka.topic_prefix).ads, 0)) == 2
    finally:
        c.close()


def test_an_unreachable_broker_is_retried_with_backoff_and_counted(tmp_path: Path) -> None:
    down = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="t-down.",
                         bootstrap_timeout_ms=2000)
    before = REGISTRY.get_sample_value("adloop_follow_retries_total", {"topic": "ads"}) or 0.0
    follower = TopicFollower(down, "ads", lambda batch: None).start()
    try:
        # the counter is process-wide (a stopping server's follower may bump it too):
        # wait for this follower's own failed attempt as well
        def retried() -> bool:
            count = REGISTRY.get_sample_value("adloop_follow_retries_total", {"topic": "ads"})
            return follower.error is not None and (count or 0.0) > before

        wait_for(retried, timeout_s=60, what="a counted retry")
        assert not follower.caught_up.is_set()
    finally:
        follower.stop()
