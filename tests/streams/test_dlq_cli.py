"""`adloop dlq`: an operator lists, inspects and re-drives dead letters, each origin once."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from kafka import KafkaConsumer, TopicPartition

from adloop.cli import main
from streams.cli_dlq import (
    ORIGIN_HEADER,
    group_letters,
    read_letters,
    redrive,
    select,
    transactional_id,
)
from streams.kafka_io import EventConsumer, EventProducer, producer_config
from streams.schemas import Click, Impression, encode
from streams.settings import KafkaSettings


def _click(i: int, ad: str = "a") -> Click:
    return Click(event_id=f"c{i}", request_id=f"r{i}", user_id=f"u{i}", ad_id=ad,
                 event_time=1.0)


def _seed_dead_letters(kafka: KafkaSettings) -> None:
    """Through a real consumer: 2 clicks its handler rejects (valid bytes), 2 malformed
    clicks and 1 malformed impression; 2 good clicks pass."""
    producer = EventProducer(kafka)
    producer.send("clicks", _click(0))
    producer.send("clicks", _click(1, ad="boom"))
    producer.send_bytes("clicks", b"\x00\xffnot json", b"u9")
    producer.send_bytes("clicks", msgspec.json.encode({"schema": 1, "event_id": "x"}), b"u8")
    producer.send("clicks", _click(2, ad="boom"))
    producer.send("clicks", _click(3))
    producer.send_bytes("impressions", b"{half", b"u7")
    producer.flush()
    producer.close()
    consumer = EventConsumer(kafka, ["clicks", "impressions"],
                             group_id=kafka.topic_prefix + "dlq-cli")
    handled: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while len(handled) < 2 or consumer.dead_lettered < 5:
            assert time.monotonic() < deadline, (handled, consumer.dead_lettered)
            for rec in consumer.poll(timeout_ms=200):
                if rec.record.ad_id == "boom":
                    consumer.send_dead_letter(rec.topic, rec.partition, rec.offset,
                                              "handler_error", "ad boom unknown",
                                              encode(rec.record), rec.key)
                else:
                    handled.append(rec.record.event_id)
            consumer.commit()
    finally:
        consumer.close()
    assert sorted(handled) == ["c0", "c3"]


def _records_with_origin(kafka: KafkaSettings, logical: str) -> list[tuple[str, bytes, bytes]]:
    """(origin header, key, value) of every record in a topic that carries an origin, as
    every adloop consumer reads it (``read_committed``)."""
    consumer = KafkaConsumer(**kafka.client_config(), enable_auto_commit=False,
                             isolation_level="read_committed")
    topic = kafka.topic_prefix + logical
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, f"{topic} not read to its end"
            for msgs in consumer.poll(timeout_ms=200).values():
                for m in msgs:
                    for name, value in m.headers or ():
                        if name == ORIGIN_HEADER:
                            out.append((value.decode(), m.key, m.value))
        return out
    finally:
        consumer.close()


def test_list_groups_dead_letters_by_source_topic_and_reason(
        kafka: KafkaSettings, capsys: pytest.CaptureFixture[str]) -> None:
    _seed_dead_letters(kafka)
    letters = read_letters(kafka)
    capsys.readouterr()
    groups = {(g.source_topic, g.reason): g.count for g in group_letters(kafka, letters)}
    assert groups == {("clicks", "handler_error"): 2, ("clicks", "not_json"): 1,
                      ("clicks", "invalid"): 1, ("impressions", "not_json"): 1}

    assert main(["dlq", "list", "--bootstrap-servers", kafka.bootstrap_servers,
                 "--topic-prefix", kafka.topic_prefix]) == 0
    out = capsys.readouterr().out
    assert "5 dead letters" in out
    row = next(line for line in out.splitlines() if "handler_error" in line)
    assert row.split()[:3] == ["clicks", "handler_error", "2"]

    assert main(["dlq", "list", "--records", "--reason", "not_json",
                 "--bootstrap-servers", kafka.bootstrap_servers,
                 "--topic-prefix", kafka.topic_prefix]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[1] for line in lines) == ["clicks", "impressions"]


def test_show_prints_one_letter_with_its_raw_bytes_and_whether_they_decode_now(
        kafka: KafkaSettings, capsys: pytest.CaptureFixture[str]) -> None:
    _seed_dead_letters(kafka)
    letters = read_letters(kafka)
    bad = next(i for i in letters if i.letter.reason == "not_json"
               and i.letter.source_topic.endswith("clicks"))
    rejected = next(i for i in letters if i.letter.reason == "handler_error")
    capsys.readouterr()
    args = ["--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix]

    assert main(["dlq", "show", str(bad.offset), *args]) == 0
    out = capsys.readouterr().out
    assert "reason         not_json" in out
    assert "00 ff 6e 6f 74 20 6a 73 6f 6e" in out  # the exact bytes, hex
    assert "key            b'u9'" in out
    assert "decodes now    no (not_json" in out

    assert main(["dlq", "show", str(rejected.offset), *args]) == 0
    out = capsys.readouterr().out
    assert "decodes now    yes, as Click" in out
    assert "ad boom unknown" in out
    assert '"ad_id": "boom"' in out

    assert main(["dlq", "show", "999", *args]) == 1


def test_redrive_sends_original_bytes_and_key_back_with_origin_and_twice_produces_once(
        kafka: KafkaSettings, capsys: pytest.CaptureFixture[str]) -> None:
    _seed_dead_letters(kafka)
    letters = read_letters(kafka)
    clicks = select(kafka, letters, topic="clicks")
    assert len(clicks) == 4

    first = redrive(kafka, clicks)
    # the two handler errors decode now; the two malformed ones would only fail again
    assert sorted(i.letter.reason for i in first.sent) == ["handler_error", "handler_error"]
    assert sorted(i.letter.reason for i, _ in first.undecodable) == ["invalid", "not_json"]
    capsys.readouterr()

    # the second run (through the command line) finds both origins already there
    assert main(["dlq", "redrive", "--topic", "clicks", "--bootstrap-servers",
                 kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix]) == 0
    assert "re-drove 0; already re-driven 2; still undecodable 2" in capsys.readouterr().out

    redriven = _records_with_origin(kafka, "clicks")
    expected = sorted((i.origin, i.letter.raw()) for i in first.sent)
    assert sorted((origin, value) for origin, _key, value in redriven) == expected
    for origin, key, value in redriven:
        click = msgspec.json.decode(value, type=Click)
        assert key == click.user_id.encode()  # same key: same partition as the original
        assert origin.startswith(kafka.topic_prefix + "clicks/")
    assert {msgspec.json.decode(v, type=Click).event_id for _o, _k, v in redriven} == {"c1", "c2"}


def test_redrive_of_a_record_dead_lettered_twice_produces_it_once_and_force_sends_bad_bytes(
        kafka: KafkaSettings) -> None:
    producer = EventProducer(kafka)
    consumer = EventConsumer(kafka, ["impressions"], group_id=None, dlq=producer,
                             subscribe=False)
    raw = encode(Impression(request_id="r", user_id="u", event_time=1.0, slate=[],
                            model_version="m"))
    # a consumer re-delivered after a crash dead-letters the same record again
    for _ in range(2):
        consumer.send_dead_letter("impressions", 3, 41, "handler_error", "boom", raw, b"u")
    consumer.send_dead_letter("impressions", 3, 42, "not_json", "bad", b"\x01", b"u")
    consumer.commit()
    consumer.close()
    producer.close()

    letters = read_letters(kafka)
    assert len(letters) == 3
    result = redrive(kafka, letters, force=True)
    assert sorted(i.origin for i in result.sent) == [
        f"{kafka.topic_prefix}impressions/3/41", f"{kafka.topic_prefix}impressions/3/42"]
    assert [i.origin for i in result.already] == [f"{kafka.topic_prefix}impressions/3/41"]
    assert sorted(v for _o, _k, v in _records_with_origin(kafka, "impressions")) == sorted(
        [raw, b"\x01"])
    again = redrive(kafka, letters, force=True)
    assert again.sent == [] and len(again.already) == 3
    assert len(_records_with_origin(kafka, "impressions")) == 2


def _dead_letter_clicks(kafka: KafkaSettings, n: int) -> list[bytes]:
    """``n`` valid clicks dead-lettered (handler_error) from clicks partition 0..3; returns
    their bytes."""
    producer = EventProducer(kafka)
    consumer = EventConsumer(kafka, ["clicks"], group_id=None, dlq=producer, subscribe=False)
    raws = []
    for i in range(n):
        raw = encode(_click(i))
        raws.append(raw)
        consumer.send_dead_letter("clicks", i % 4, 1000 + i, "handler_error", "boom", raw,
                                  f"u{i}".encode())
    consumer.commit()
    consumer.close()
    producer.close()
    return raws


def test_redrive_fences_a_concurrent_run_that_has_not_committed_and_sends_each_origin_once(
        kafka: KafkaSettings) -> None:
    """The mechanism, step by step: a run that has sent an origin but not committed yet
    (its scan happened before ours) is fenced by our ``init_transactions``; our scan does
    not count its uncommitted record, we send and commit; its commit then fails, so the
    origin is in the topic once."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    _dead_letter_clicks(kafka, 3)
    letters = read_letters(kafka)
    physical = kafka.topic_prefix + "clicks"
    other = KafkaProducer(**producer_config(kafka, transactional_id=transactional_id(physical)))
    other.init_transactions()
    other.begin_transaction()
    first = letters[0]
    other.send(physical, value=first.letter.raw(), key=b"u0",
               headers=[(ORIGIN_HEADER, first.origin.encode())]).get(timeout=30)

    result = redrive(kafka, letters)
    assert sorted(i.origin for i in result.sent) == sorted(i.origin for i in letters)

    with pytest.raises(KafkaError):
        other.commit_transaction()
    other.close(timeout=5)
    origins = Counter(o for o, _k, _v in _records_with_origin(kafka, "clicks"))
    assert origins == Counter({i.origin: 1 for i in letters})


def test_two_concurrent_redrive_processes_send_each_origin_exactly_once(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    n = 300
    raws = _dead_letter_clicks(kafka, n)
    cmd = [sys.executable, "-m", "adloop", "dlq", "redrive", "--topic", "clicks",
           "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix]
    repo = Path(__file__).resolve().parents[2]
    logs = [tmp_path / f"redrive{i}.out" for i in range(2)]
    procs = []
    for path in logs:
        with path.open("wb") as out:
            procs.append(subprocess.Popen(cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT))
    for proc in procs:
        assert proc.wait(timeout=180) == 0, [p.read_text() for p in logs]
    outs = [p.read_text() for p in logs]
    sent = [int(o.split("re-drove ", 1)[1].split(";")[0]) for o in outs]
    already = [int(o.split("already re-driven ", 1)[1].split(";")[0]) for o in outs]
    # between them the two runs sent every origin once; what one sent, the other found
    assert sum(sent) == n and [s + a for s, a in zip(sent, already, strict=True)] == [n, n], outs

    redriven = _records_with_origin(kafka, "clicks")
    origins = Counter(origin for origin, _k, _v in redriven)
    assert len(origins) == n and set(origins.values()) == {1}, origins.most_common(3)
    assert Counter(v for _o, _k, v in redriven) == Counter(raws)
