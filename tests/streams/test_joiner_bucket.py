"""The A/B bucket of an impression (``Impression.bucket``) on every feedback revision the
joiner emits for it, on the real broker, across a restart from the changelog too."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from streams.joiner import Joiner
from streams.joiner_core import JoinSettings
from streams.kafka_io import EventProducer, read_all
from streams.schemas import Feedback, Impression, encode
from streams.settings import KafkaSettings
from tests.streams.test_joiner_helpers import JoinerProcess, click, imp, topic_of, wait_for

pytestmark = pytest.mark.kafka
WINDOWS = {"observation_window_s": 10, "attribution_window_s": 100, "out_of_orderness_s": 0,
           "orphan_grace_s": 50, "dedup_retention_s": 50, "emit_every_s": 1}


def bucketed(rid: str, t: float, bucket: str, user: str = "u1") -> Impression:
    return msgspec.structs.replace(imp(rid, t, user=user), bucket=bucket,
                                   model_version=f"m-{bucket or 'none'}")


def test_every_feedback_revision_carries_the_impressions_bucket(kafka: KafkaSettings,
                                                                tmp_path: Path) -> None:
    p = EventProducer(kafka)
    buckets = {"r-control": "control", "r-online": "online", "r-none": ""}
    for n, (rid, bucket) in enumerate(buckets.items()):   # one user: one partition
        p.send("impressions", bucketed(rid, n, bucket))
    p.send("impressions", imp("tick", 15))
    p.flush()
    joiner = JoinerProcess(kafka, tmp_path / "join.log", **WINDOWS).start()
    try:
        wait_for(kafka, "feedback", lambda fbs: set(buckets) <= {f.request_id for f in fbs},
                 proc=joiner)
        # a click after the provisional lists (a correction), then time moves past them all
        for rec in (click("c1", "r-control", 20), click("c2", "r-online", 21),
                    imp("tick2", 30)):
            p.send(topic_of(rec), rec)
        p.flush()
        wait_for(kafka, "feedback", lambda fbs: {("r-control", "correction"),
                                                 ("r-online", "correction")}
                 <= {(f.request_id, f.kind) for f in fbs}, proc=joiner)
        p.send("impressions", imp("end", 1000))
        p.flush()
        fbs: list[Feedback] = wait_for(
            kafka, "feedback", lambda fbs: {(r, "final") for r in buckets}
            <= {(f.request_id, f.kind) for f in fbs}, proc=joiner)
    finally:
        assert joiner.stop() == 0
        p.close()
    for rid, bucket in buckets.items():
        mine = sorted((f for f in fbs if f.request_id == rid), key=lambda f: f.revision)
        kinds = [f.kind for f in mine]
        assert kinds[0] == "provisional" and kinds[-1] == "final"
        if rid != "r-none":
            assert "correction" in kinds            # the click changed the list
        assert {f.bucket for f in mine} == {bucket}, rid
        assert {f.model_version for f in mine} == {f"m-{bucket or 'none'}"}


def test_the_bucket_survives_a_restart_from_the_changelog(
        kafka: KafkaSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = JoinSettings(**WINDOWS, app_id="bucket-restart")   # type: ignore[arg-type]
    first = Joiner(settings, kafka)
    try:
        first.ensure_changelog()
        monkeypatch.setattr(first.consumer, "highwater", lambda _tp: 0)
        first.load([0])
        first.process("impressions", 0, 0, b"u1", encode(bucketed("r1", 0, "control")))
        first.process("impressions", 0, 1, b"u2", encode(imp("tick", 20, user="u2")))
        first.commit()                                  # the provisional list, then a stop
    finally:
        first.consumer.close(autocommit=False)
        first.producer.close()

    second = Joiner(settings, kafka)
    try:
        monkeypatch.setattr(second.consumer, "highwater", lambda _tp: 0)
        second.load([0])
        st = second.core.get("r1")
        assert st is not None and st.impression is not None
        assert st.impression.bucket == "control"
        second.process("clicks", 0, 0, b"u1", encode(click("c1", "r1", 21)))
        second.process("impressions", 0, 2, b"u2", encode(imp("end", 1000, user="u2")))
        second.commit()
    finally:
        second.consumer.close(autocommit=False)
        second.producer.close()
    fbs = [r.record for r in read_all(kafka, "feedback") if r.record.request_id == "r1"]
    assert [f.kind for f in sorted(fbs, key=lambda f: f.revision)] == [
        "provisional", "correction", "final"]
    assert {f.bucket for f in fbs} == {"control"}
