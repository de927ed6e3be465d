"""Poison bytes on ``feedback``, ``ads`` and ``organic-items`` never stop the learner:
each bad record is dead-lettered with its reason (once, also across a restart) and every
good list after it is trained."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgspec

from adloop.stack import ManagedProcess, free_port
from learner import synthetic
from learner.online import check_trainable
from learner.pretrain import PretrainSettings, pretrain
from streams.kafka_io import EventProducer, read_all
from streams.schemas import DeadLetter, OrganicItem
from streams.settings import KafkaSettings
from streams.topics import Topics


def _trained(state_dir: Path) -> Counter[str]:
    out: Counter[str] = Counter()
    for seg in sorted((state_dir / "ledger").glob("*.jsonl")):
        for line in seg.read_text().splitlines():
            out[json.loads(line)["outcome"]] += 1
    return out


def _ledger_request_ids(state_dir: Path) -> set[str]:
    return {json.loads(line)["request_id"]
            for seg in sorted((state_dir / "ledger").glob("*.jsonl"))
            for line in seg.read_text().splitlines()}


def _letters(kafka: KafkaSettings) -> list[DeadLetter]:
    return [r.record for r in read_all(kafka, "dlq", timeout_s=10)]


def test_poison_feedback_and_ads_are_dead_lettered_and_training_goes_on(
        kafka: KafkaSettings, tmp_path: Path, synth_log: synthetic.SyntheticLog,
        make_settings: Callable[..., PretrainSettings]) -> None:
    pre = tmp_path / "pretrain"
    pretrain(make_settings(pre, steps=10), synth_log.ads, synth_log.feedback)
    good = synth_log.feedback[:60]
    huge = msgspec.structs.replace(good[0], request_id="huge-reward", items=[
        msgspec.structs.replace(good[0].items[0], reward=1e300)])
    no_advertiser = msgspec.structs.replace(synth_log.ads[0], ad_id="ad-without-advertiser",
                                            advertiser_id="")
    p = EventProducer(kafka)
    for ad in synth_log.ads:
        p.send("ads", ad)
    poison_ads = [(b"\xff\xfe", b'"\x80"'), (b"ad-deep", b"[" * 100_000)]
    for key, value in poison_ads:
        p.send_bytes("ads", value, key)
    p.send("ads", no_advertiser)
    organic = [OrganicItem(item_id=f"gaming/consoles#{n}", kind="video", topic="gaming/consoles",
                           title=f"console review {n}", created_time=0.0, event_time=0.0)
               for n in range(3)]
    for item in organic[:2]:
        p.send("organic-items", item)
    p.send_bytes("organic-items", b'{"item_id": "x#1", "kind": "podcast"}', b"x#1")
    p.send("organic-items", organic[2])
    poison_feedback = [(b"u", b'"\x80"'), (b"\x80\x81", b'{"\x80":1}'), (b"u", None),
                       (b"u", b"[" * 100_000)]
    for fb in good[:30]:
        p.send("feedback", fb, key="u")
    for key, value in poison_feedback:
        p.send_bytes("feedback", value, key)  # type: ignore[arg-type]
    p.send("feedback", huge, key="u")
    for fb in good[30:]:
        p.send("feedback", fb, key="u")
    p.flush()
    p.close()
    expected = {("ads", "not_json"): 2, ("ads", "handler_error"): 1,
                ("organic-items", "invalid"): 1,
                ("feedback", "not_json"): 3, ("feedback", "invalid"): 1,
                ("feedback", "handler_error"): 1}

    state, store = tmp_path / "state", tmp_path / "store"

    def learner() -> ManagedProcess:
        port = free_port()
        return ManagedProcess("learn", [
            "learn", "--bootstrap-servers", kafka.bootstrap_servers,
            "--topic-prefix", kafka.topic_prefix, "--init-run-dir", str(pre),
            "--state-dir", str(state), "--snapshot-store", str(store), "--batch-lists", "16",
            "--max-wait-s", "0.1", "--checkpoint-every-s", "0.3", "--holdout-every", "0",
            "--threads", "1", "--metrics-port", str(port)], tmp_path / "logs",
            ready_url=f"http://127.0.0.1:{port}/readyz")

    def dead() -> Counter[tuple[str, str]]:
        names = Topics(kafka.topic_prefix)
        return Counter((names.logical(d.source_topic), d.reason) for d in _letters(kafka))

    proc = learner().start()
    proc.wait_ready(180)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
            sum(_trained(state).values()) < len(good) + 1 or dead() != expected):
        assert proc.alive(), proc.log_tail()
        time.sleep(0.5)
    assert proc.alive(), proc.log_tail()
    assert proc.stop() == 0, proc.log_tail()
    outcomes = _trained(state)
    assert outcomes["trained"] == len(good) and outcomes["handler_error"] == 1, outcomes
    assert dead() == expected
    letters = {d.detail: d for d in _letters(kafka)}
    assert any("reward" in detail and "1e+300" in detail for detail in letters)
    assert any("advertiser_id" in detail for detail in letters)
    # the good organic items got ids and every snapshot since serves them
    manifests = sorted(store.glob("v*/manifest.json"))
    assert manifests
    assert set(json.loads(manifests[-1].read_text())["organic_ids"]) == {
        o.item_id for o in organic}

    # a restart re-reads ``ads`` from offset 0: no second dead letter for the bad ones
    again = learner().start()
    again.wait_ready(180)   # ready: the catalogue (ads, organic-items) re-read to its end
    # a marker list after every feedback record: once it is trained, the restarted
    # learner has been through all of ``feedback`` too
    p = EventProducer(kafka)
    p.send("feedback", msgspec.structs.replace(good[0], request_id="marker"), key="u")
    p.flush()
    p.close()
    deadline = time.monotonic() + 120
    while "marker" not in _ledger_request_ids(state):
        assert again.alive(), again.log_tail()
        assert time.monotonic() < deadline, "the marker list never reached the ledger"
        time.sleep(0.5)
    assert again.stop() == 0, again.log_tail()
    assert dead() == expected


def test_a_list_with_a_reward_beyond_float32_is_not_trainable(
        synth_log: synthetic.SyntheticLog) -> None:
    fb = synth_log.feedback[0]
    check_trainable(fb)
    for field, value in (("reward", 1e39), ("conversion_value", -1e300), ("bid", 4e38)):
        bad = msgspec.structs.replace(fb, items=[
            msgspec.structs.replace(fb.items[0], **{field: value})])
        try:
            check_trainable(bad)
        except ValueError as exc:
            assert field in str(exc)
        else:
            raise AssertionError(f"{field}={value} passed")


def test_a_list_with_a_logged_beam_beyond_float32_is_not_trainable(
        synth_log: synthetic.SyntheticLog) -> None:
    from streams.schemas import BeamCandidate

    beam = BeamCandidate(ad_id="ad-1", semantic_id=[1, 2], logprob=-1.0, expected_value=0.1,
                         bid=1.0, bid_type="cpc")
    fb = msgspec.structs.replace(synth_log.feedback[0], beams=[beam])
    check_trainable(fb)
    for field, value in (("logprob", -1e39), ("expected_value", 1e300), ("bid", 4e38)):
        bad = msgspec.structs.replace(fb, beams=[beam, msgspec.structs.replace(
            beam, **{field: value})])
        try:
            check_trainable(bad)
        except ValueError as exc:
            assert f"beams[1].{field}" in str(exc)
        else:
            raise AssertionError(f"{field}={value} passed")
