"""Recorded traffic: the format, deterministic replay, bad lines, the Criteo converter,
and ``adloop replay --from`` into a real broker."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from adloop import cli
from streams.joiner_core import END_OF_STREAM_REQUEST_ID as END_OF_STREAM
from streams.kafka_io import read_all
from streams.schemas import Click, Event, encode
from streams.settings import KafkaSettings
from traffic.driver import Emitter, OraclePolicy, TrafficDriver
from traffic.recorded import (
    RecordError,
    RecordWriter,
    convert_criteo_attribution,
    read_recorded,
)
from traffic.replay import replay_recorded
from traffic.world import World, WorldConfig


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """``adloop.cli.main`` binds structlog to this test's captured stderr; undo that."""
    yield
    structlog.reset_defaults()


def _record_run(path: Path, seed: int = 1, n: int = 300) -> str:
    world = World(WorldConfig(seed=seed, n_users=100, n_ads=30))
    writer = RecordWriter(path)
    stats = TrafficDriver(world, Emitter(recorder=writer)).run_inprocess(OraclePolicy(world), n)
    writer.close()
    return stats.events_sha256


def _replay(path: Path, **kw: object) -> tuple[Emitter, object]:
    emitter = Emitter(keep=True)
    stats = asyncio.run(replay_recorded(path, emitter, **kw))  # type: ignore[arg-type]
    return emitter, stats


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet"])
def test_replay_of_a_recorded_run_reproduces_its_stream(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"run{suffix}"
    original = _record_run(path)
    e1, s1 = _replay(path, speed=0)
    e2, _ = _replay(path, speed=0)
    assert e1.sha256 == original == e2.sha256
    assert s1.by_kind["request"] == 300 and s1.by_kind["ad"] >= 30  # type: ignore[attr-defined]
    kinds = {r.kind for r in read_recorded(path)}
    assert kinds == {"ad", "organic_item", "request", "impression", "click", "conversion"}


def test_format_is_one_json_object_per_line_with_type_and_t(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _record_run(path, n=50)
    for line in path.read_text().splitlines():
        obj = json.loads(line)
        assert obj["type"] in {"ad", "organic_item", "request", "impression", "click",
                               "conversion"}
        assert isinstance(obj["t"], float)


HAND_WRITTEN = """\
# a hand-written log: event_time defaults to t
{"type": "ad", "t": 100.0, "ad_id": "a1", "advertiser_id": "v1", "industry": "retail", \
"bid_type": "cpc", "conversion_goal": "purchase", "bid": 1.0, "budget": 10.0, \
"title": "Trail running shoes from Acme", "description": "Retail"}
{"type": "request", "t": 101.0, "request_id": "r1", "user_id": "u1", \
"context": {"device": "mobile"}, "k": 3}
{"type": "click", "t": 102.0, "event_id": "e1", "request_id": "r1", "user_id": "u1", "ad_id": "a1"}
this is not json
{"type": "click", "t": 103.0, "event_id": "e2", "request_id": "r1", "user_id": "u1"}
{"type": "mystery", "t": 104.0}

{"type": "conversion", "t": 105.0, "event_id": "e3", "request_id": "r1", "user_id": "u1", \
"ad_id": "a1", "value": 12.5}
"""


def test_corrupt_lines_are_reported_with_line_numbers_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(HAND_WRITTEN)
    errors: list[RecordError] = []
    entries = list(read_recorded(path, "skip", errors))
    assert [e.kind for e in entries] == ["ad", "request", "click", "conversion"]
    assert [e.line for e in entries] == [2, 3, 4, 9]
    assert entries[2].record.event_time == 102.0  # type: ignore[union-attr]
    assert [str(e).split(":")[0] for e in errors] == ["line 5", "line 6", "line 7"]
    assert "ad_id" in str(errors[1]) and "mystery" in str(errors[2])
    emitter, stats = _replay(path, speed=0, on_error="skip")
    assert emitter.counts["clicks"] == 1 and emitter.counts["conversions"] == 1
    assert len(stats.bad_lines) == 3 and stats.stopped_at_line is None  # type: ignore[attr-defined]


def test_corrupt_line_can_stop_the_replay(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(HAND_WRITTEN)
    with pytest.raises(RecordError, match="line 5: not JSON"):
        list(read_recorded(path, "stop"))
    emitter, stats = _replay(path, speed=0, on_error="stop")
    assert stats.stopped_at_line == 5  # type: ignore[attr-defined]
    assert emitter.counts["clicks"] == 1 and emitter.counts["conversions"] == 0
    code = cli.main(["replay", "--from", str(path), "--speed", "0", "--no-kafka",
                            "--server-url", "", "--on-error", "stop"])
    assert code == 2


def test_replay_preserves_inter_arrival_times_at_n_times_speed(tmp_path: Path) -> None:
    path = tmp_path / "timed.jsonl"
    lines = [{"type": "click", "t": 1000.0 + dt, "event_id": f"e{i}", "request_id": "r",
              "user_id": "u", "ad_id": "a"} for i, dt in enumerate([0.0, 2.0, 3.0, 7.0])]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    seen: list[float] = []

    class Clocked:
        def send(self, topic: str, record: Event) -> None:
            seen.append(time.monotonic())

    t0 = time.monotonic()
    asyncio.run(replay_recorded(path, Emitter(producer=Clocked()), speed=10.0))
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert seen[0] - t0 < 0.1
    for got, want in zip(gaps, [0.2, 0.1, 0.4], strict=True):
        assert abs(got - want) < 0.06, gaps


CRITEO_SAMPLE = (
    "timestamp\tuid\tcampaign\tconversion\tconversion_timestamp\tconversion_id\tattribution\t"
    "click\tclick_pos\tclick_nb\tcost\tcpo\ttime_since_last_click\tcat1\tcat2\tcat3\tcat4\t"
    "cat5\tcat6\tcat7\tcat8\tcat9\n"
    "0\t11\t501\t1\t900\t77\t1\t1\t0\t2\t0.002\t12.5\t-1\t5\t6\t7\t8\t9\t1\t2\t3\t4\n"
    "10\t12\t502\t0\t-1\t-1\t0\t0\t-1\t-1\t0.001\t8.0\t-1\t5\t6\t7\t8\t9\t1\t2\t3\t4\n"
    "20\t11\t501\t1\t900\t77\t1\t1\t1\t2\t0.002\t12.5\t20\t5\t6\t7\t8\t9\t1\t2\t3\t4\n"
    "30\t13\t502\t0\t-1\t-1\t0\t1\t-1\t-1\t0.001\t8.0\t-1\t5\t6\t7\t8\t9\t1\t2\t3\t4\n"
    "oops\t13\n"
    "4000\t14\t503\t1\t4100\t78\t0\t0\t-1\t-1\t0.001\t3.0\t-1\t5\t6\t7\t8\t9\t1\t2\t3\t4\n"
)


def test_criteo_attribution_converter(tmp_path: Path) -> None:
    src, dst = tmp_path / "criteo.tsv", tmp_path / "criteo.jsonl"
    src.write_text(CRITEO_SAMPLE)
    counts = convert_criteo_attribution(src, dst, start_time=0.0)
    assert counts == {"rows": 6, "ad": 3, "impression": 5, "click": 3, "conversion": 1,
                      "bad_rows": 1}
    entries = list(read_recorded(dst, "stop"))
    times = [e.t for e in entries]
    assert times == sorted(times)
    conv = [e for e in entries if e.kind == "conversion"]
    assert len(conv) == 1 and conv[0].t == 900.0
    assert conv[0].record.value == 12.5  # type: ignore[union-attr]
    assert conv[0].record.request_id == "criteo-000000003"  # type: ignore[union-attr]
    emitter, _ = _replay(dst, speed=0)  # no server: impressions go to Kafka too
    assert emitter.counts["impressions"] == 5


def test_cli_replays_a_recorded_file_into_kafka(tmp_path: Path, kafka: KafkaSettings,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.jsonl"
    original = _record_run(path, n=150)
    code = cli.main(["replay", "--from", str(path), "--speed", "0", "--server-url", "",
                            "--bootstrap-servers", kafka.bootstrap_servers,
                            "--topic-prefix", kafka.topic_prefix])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["events_sha256"] == original
    expected: dict[str, Counter[bytes]] = {}
    for e in read_recorded(path):
        if e.topic is not None:
            expected.setdefault(e.topic, Counter())[encode(e.record)] += 1  # type: ignore[arg-type]
    for topic, want in expected.items():
        got = read_all(kafka, topic, timeout_s=30, expect=sum(want.values()))
        got = [r for r in got if getattr(r.record, "request_id", "") != END_OF_STREAM]
        assert Counter(encode(r.record) for r in got) == want, topic


def test_bad_bytes_in_a_recorded_file_are_reported_with_line_numbers_and_skipped(
        tmp_path: Path) -> None:
    good = b'{"type":"click","t":5,"event_id":"c","request_id":"r","user_id":"u","ad_id":"a"}'
    lines = [
        b'"\x80"',                                      # 1: not UTF-8
        b'{"type":"click","\x80":1}',                   # 2: non-UTF-8 key
        b"[" * 100_000,                                  # 3: nested too deep
        b"\xef\xbb\xbf" + good,                          # 4: byte-order mark
        b'{"type":"click","t":' + b"9" * 400 + b"}",     # 5: an integer no float holds
        b'{"type":"click","t":NaN}',                     # 6: NaN literal
        good,                                            # 7
    ]
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    errors: list[RecordError] = []
    entries = list(read_recorded(path, "skip", errors))
    assert [e.line for e in entries] == [7]
    assert [e.line for e in errors] == [1, 2, 3, 4, 5, 6]
    assert "not UTF-8" in str(errors[0]) and "too deep" in str(errors[2])
    emitter, stats = _replay(path, speed=0, on_error="skip")
    assert emitter.counts["clicks"] == 1
    assert len(stats.bad_lines) == 6  # type: ignore[attr-defined]


def test_replay_without_an_answering_server_produces_every_impression_and_closes_windows(
        tmp_path: Path, kafka: KafkaSettings, capsys: pytest.CaptureFixture[str]) -> None:
    """The documented no-server replay: a server URL is set (the default) but nothing
    answers there, so every impression goes to Kafka; the summary counts read vs
    produced; the end-of-stream marker lets the joiner emit a final list for every
    request although the log ends inside their attribution windows."""
    from streams.joiner_core import END_OF_STREAM_REQUEST_ID
    from streams.schemas import Feedback
    from tests.streams.test_joiner_helpers import JoinerProcess, wait_for

    path = tmp_path / "run.jsonl"
    _record_run(path, n=60)
    n_imp = sum(1 for e in read_recorded(path) if e.kind == "impression")
    code = cli.main(["replay", "--from", str(path), "--speed", "0",
                     "--server-url", "http://127.0.0.1:9", "--timeout-s", "0.5",
                     "--on-error", "stop",
                     "--bootstrap-servers", kafka.bootstrap_servers,
                     "--topic-prefix", kafka.topic_prefix])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["by_kind"]["impression"] == n_imp == summary["produced"]["impression"]
    assert summary["missing"] == {} and summary["end_of_stream"] is not None
    got = read_all(kafka, "impressions", timeout_s=30, expect=n_imp + 1)
    markers = [r for r in got if r.record.request_id == END_OF_STREAM_REQUEST_ID]
    assert len(got) - len(markers) == n_imp and len(markers) >= 1
    joiner = JoinerProcess(kafka, tmp_path / "join.log").start()
    try:
        finals = wait_for(kafka, "feedback", lambda rs: len(
            {f.request_id for f in rs if isinstance(f, Feedback) and f.kind == "final"})
            >= n_imp, timeout_s=120, proc=joiner)
    finally:
        joiner.stop()
    assert {f.request_id for f in finals if f.kind == "final"} == {
        e.record.request_id for e in read_recorded(path)  # type: ignore[union-attr]
        if e.kind == "impression"}


def test_impressions_skip_is_not_a_mismatch_but_counted(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _record_run(path, n=20)
    emitter, stats = _replay(path, speed=0, impressions="skip")
    assert emitter.counts["impressions"] == 0
    assert stats.skipped["impression"] == stats.by_kind["impression"] > 0  # type: ignore[attr-defined]
    assert stats.missing() == {}  # type: ignore[attr-defined]


def _clicks_at(path: Path, times: list[float]) -> None:
    path.write_text("".join(json.dumps({"type": "click", "t": t, "event_id": f"e{i}",
                                        "request_id": "r", "user_id": "u", "ad_id": "a"})
                            + "\n" for i, t in enumerate(times)))


def test_a_far_future_line_is_clamped_to_max_gap_and_replay_finishes(tmp_path: Path) -> None:
    """Line 3 jumps ~31,000 years ahead, line 4 comes back: replay waits at most
    max_gap_s / speed for each jump instead of sleeping until the far-future time, keeps
    the pacing of the ordinary lines, reports both jumps with their line and gap (the
    ``replay.gap_clamped`` log line carries the same), counts them, and produces every
    record unchanged."""
    from prometheus_client import REGISTRY

    path = tmp_path / "jump.jsonl"
    _clicks_at(path, [1000.0, 1001.0, 1e12, 1002.0, 1003.0])
    sent: list[tuple[float, float]] = []

    class Clocked:
        def send(self, topic: str, record: Event) -> None:
            sent.append((time.monotonic(), record.event_time))  # type: ignore[attr-defined]

    def clamped(direction: str) -> float:
        return REGISTRY.get_sample_value("adloop_traffic_replay_gaps_clamped_total",
                                         {"direction": direction}) or 0.0

    before = clamped("forward"), clamped("backward")
    stop = threading.Event()
    result: list[object] = []
    t0 = time.monotonic()
    worker = threading.Thread(target=lambda: result.append(asyncio.run(replay_recorded(
        path, Emitter(producer=Clocked()), speed=10.0, max_gap_s=2.0, stop=stop))))
    worker.start()
    worker.join(timeout=10.0)
    stop.set()  # a replay still sleeping (the bug) is stopped, then the test fails
    worker.join(timeout=5.0)
    assert result, "replay did not finish within 10 s of a far-future line"
    stats = result[0]
    assert [t for _, t in sent] == [1000.0, 1001.0, 1e12, 1002.0, 1003.0]
    # pacing: 0.1 s, then the jump clamped to 2 s / 10, back at once, then 0.1 s
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(sent)]
    for got, want in zip(gaps, [0.1, 0.2, 0.0, 0.1], strict=True):
        assert abs(got - want) < 0.06, gaps
    assert sent[-1][0] - t0 < 1.0
    assert stats.gaps_clamped == [  # type: ignore[attr-defined]
        "line 3: t jumps +999999998999.000 s (more than max_gap_s=2)",
        "line 4: t jumps -999999998998.000 s (more than max_gap_s=2)"]
    assert (clamped("forward"), clamped("backward")) == (before[0] + 1, before[1] + 1)


def test_cli_max_gap_setting_reaches_replay_and_the_summary_counts_clamps(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "jump.jsonl"
    _clicks_at(path, [1000.0, 1000.25, 4e9, 4e9 + 0.25])
    monkeypatch.setenv("ADLOOP_REPLAY_MAX_GAP_S", "0.5")
    code = cli.main(["replay", "--from", str(path), "--speed", "10", "--no-kafka",
                     "--server-url", ""])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["gaps_clamped"] == 1 and summary["by_kind"] == {"click": 4}
    assert summary["wall_s"] < 5.0
    assert out[0].startswith("line 3: t jumps +") and "max_gap_s=0.5" in out[0]


def test_non_finite_t_in_parquet_is_a_bad_line(tmp_path: Path) -> None:
    """JSON has no infinity, Parquet's float64 column does: such a line is refused, not
    replayed (it would put the pacing at an infinite time)."""
    path = tmp_path / "inf.parquet"
    with RecordWriter(path) as writer:
        writer.write("click", float("inf"), Click(event_id="e", request_id="r", user_id="u",
                                                   ad_id="a", event_time=1.0))
    with pytest.raises(RecordError, match="line 1: non-finite 't'"):
        list(read_recorded(path, "stop"))
