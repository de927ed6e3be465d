"""The live A/B monitor and rollback in the learner, on the real broker (own topics per
test): an online bucket clearly worse than control gets a signed rollback model-update
that re-announces the best earlier version, logged with its evidence and counted;
equal buckets get none. The learner runs in-process and is stepped by the test."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition

from learner import abmonitor, online, synthetic
from learner.online import LearnerService, LearnerSettings
from learner.pretrain import PretrainSettings, pretrain
from streams.kafka_io import EventProducer, read_all
from streams.schemas import Feedback
from streams.settings import KafkaSettings
from streams.signing import Keyring, generate_keyring_file, read_keyring_file, verify_update
from streams.topics import Topics

MIN_REQUESTS = 200


class LogRecorder:
    """Stands in for the learner's logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _rec(self, level: str) -> Callable[..., None]:
        return lambda event, **kw: self.lines.append((level, event, kw))

    def __getattr__(self, level: str) -> Callable[..., None]:
        return self._rec(level)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [kw for _, event, kw in self.lines if event == name]


@pytest.fixture(scope="module")
def pretrained(synth_log: synthetic.SyntheticLog, make_settings: Callable[..., PretrainSettings],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("abtest") / "pretrain"
    pretrain(make_settings(run, steps=20), synth_log.ads, synth_log.feedback)
    return run


@pytest.fixture
def learner(kafka: KafkaSettings, tmp_path: Path, pretrained: Path,
            synth_log: synthetic.SyntheticLog, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[LearnerService, LogRecorder]]:
    """An in-process learner on ``kafka`` that publishes only when the test says so."""
    producer = EventProducer(kafka)
    for ad in synth_log.ads:
        producer.send("ads", ad)
    producer.flush()
    producer.close()
    keys = tmp_path / "model-updates.keys"
    generate_keyring_file(keys)
    recorder = LogRecorder()
    monkeypatch.setattr(online, "log", recorder)
    s = LearnerSettings(
        bootstrap_servers=kafka.bootstrap_servers, topic_prefix=kafka.topic_prefix,
        init_run_dir=pretrained, state_dir=tmp_path / "state",
        snapshot_store=str(tmp_path / "store"), update_keys_file=keys, batch_lists=32,
        max_wait_s=0.05, snapshot_every_updates=10**9, snapshot_every_s=1e9,
        checkpoint_every_s=1e9, guard_min_lists=10**9, threads=1, holdout_every=0,
        abtest_min_requests=MIN_REQUESTS, abtest_resume_requests=150)
    svc = LearnerService(s)
    svc.start()
    try:
        yield svc, recorder
    finally:
        svc.close()


def _end(kafka: KafkaSettings) -> int:
    topic = Topics(kafka.topic_prefix).feedback
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        return sum(c.end_offsets(tps).values())
    finally:
        c.close()


def _feed(kafka: KafkaSettings, svc: LearnerService, records: list[Feedback],
          timeout_s: float = 60.0) -> None:
    """Produce ``records`` (one key: one partition, so one order) and step the learner
    until it has consumed and trained all of them."""
    producer = EventProducer(kafka)
    for fb in records:
        producer.send("feedback", fb, key="ab-test")
    producer.flush()
    producer.close()
    end = _end(kafka)
    deadline = time.monotonic() + timeout_s
    while sum(svc.consumer_positions().values()) < end or svc.pending:
        assert time.monotonic() < deadline, "the learner did not consume the records"
        svc.step(poll_timeout_ms=100)
        if svc.pending and sum(svc.consumer_positions().values()) >= end:
            svc.train_pending()


def _records(log: synthetic.SyntheticLog, start: int, n: int, rng: np.random.Generator,
             plan: list[tuple[str, str, float]]) -> list[Feedback]:
    """``n`` final records from ``start`` on, cycling through ``plan``'s (bucket,
    model version, chance that an item is clicked and pays 1)."""
    out = []
    for i in range(n):
        bucket, version, p = plan[i % len(plan)]
        base = log.feedback[(start + i) % len(log.feedback)]
        items = [msgspec.structs.replace(it, clicked=bool(c), converted=False,
                                         conversion_value=0.0, reward=float(c))
                 for it, c in zip(base.items, rng.random(len(base.items)) < p, strict=True)]
        t = 1_000_000.0 + start + i
        out.append(msgspec.structs.replace(
            base, request_id=f"ab-{start + i}", kind="final", revision=0, impression_time=t,
            event_time=t + 60.0, bucket=bucket, model_version=version, items=items))
    return out


def _train_and_publish(kafka: KafkaSettings, svc: LearnerService,
                       log: synthetic.SyntheticLog, start: int) -> str:
    _feed(kafka, svc, [msgspec.structs.replace(fb, request_id=f"train-{start + i}")
                       for i, fb in enumerate(log.feedback[start:start + 64])])
    assert svc.publish()
    assert svc.last_published is not None
    return svc.last_published


def _value(metric: Any) -> float:
    return float(metric._value.get())


def test_online_clearly_worse_than_control_rolls_back_to_the_best_earlier_version(
        kafka: KafkaSettings, tmp_path: Path, synth_log: synthetic.SyntheticLog,
        learner: tuple[LearnerService, LogRecorder]) -> None:
    svc, logs = learner
    v1 = svc.last_published                        # published at start: the control model
    v2 = _train_and_publish(kafka, svc, synth_log, 0)
    v3 = _train_and_publish(kafka, svc, synth_log, 64)
    assert (v1, v2, v3) == ("v000001", "v000002", "v000003")
    worse = _value(abmonitor.DECISIONS.labels("online_worse"))
    published = _value(abmonitor.ROLLBACKS.labels("published"))
    rng = np.random.default_rng(1000)
    # v2 served the online bucket and earned more than control; then v3, far less
    _feed(kafka, svc, _records(synth_log, 0, 2 * 300, rng,
                               [("online", v2, 0.4), ("control", v1, 0.3)]))
    assert svc.ab_pending is None and svc.monitor.verdict(v2) != "online_worse"
    _feed(kafka, svc, _records(synth_log, 600, 2 * 600, rng,
                               [("online", v3, 0.03), ("control", v1, 0.3)]))
    assert _value(abmonitor.DECISIONS.labels("online_worse")) == worse + 1
    assert _value(abmonitor.PROMOTION_HELD) == 1
    [decision] = logs.events("abtest.decision")
    assert decision["decision"] == "online_worse" and decision["rpm_diff_upper"] < 0
    assert decision["n_online"] >= MIN_REQUESTS and decision["n_control"] >= MIN_REQUESTS
    assert decision["control_version"] == v1 and decision["current_online_version"] == v3
    assert decision["online"]["rpm"] < decision["control"]["rpm"]

    # the loop step after the decision rolled back (no publish was due: snapshot_every_s
    # is 1e9): v2's snapshot under a new id, signed
    assert svc.ab_pending is None
    v4 = svc.last_published
    assert v4 == "v000004"
    assert _value(abmonitor.ROLLBACKS.labels("published")) == published + 1
    [rollback] = logs.events("abtest.rollback")
    assert rollback["result"] == "published" and rollback["restores"] == v2
    assert rollback["version"] == v4 and rollback["rpm_diff_upper"] < 0
    updates = {u.version: u for u in (r.record for r in read_all(kafka, "model-updates"))}
    assert sorted(updates) == [v1, v2, v3, v4]
    update = updates[v4]
    assert update.parent == v2
    assert update.data_watermark >= updates[v3].data_watermark
    assert verify_update(update, _keyring(tmp_path)) is None
    manifest = json.loads((tmp_path / "store" / v4 / "manifest.json").read_text())
    v2_manifest = json.loads((tmp_path / "store" / v2 / "manifest.json").read_text())
    assert manifest["republished_from"] == v2 and manifest["version"] == v4
    assert manifest["files"] == v2_manifest["files"]          # the same graphs
    assert manifest["rollback"]["decision"]["decision"] == "online_worse"
    # training went on from v2's weights (the lists read after the decision trained on
    # them); promotion is held
    assert rollback["trains_from"] == v2
    for name, p in svc.weights[v4].items():
        assert torch.equal(p, svc.weights[v2][name]), name
    assert svc.ab_hold is not None and svc.ab_hold["restored"] == v4
    assert not svc.publish() and svc.last_published == v4
    assert logs.events("abtest.promotion_held")

    # the restored version holds its own against control: promotion resumes
    _feed(kafka, svc, _records(synth_log, 1800, 2 * 200, rng,
                               [("online", v4, 0.3), ("control", v1, 0.3)]))
    assert svc.ab_hold is None and _value(abmonitor.PROMOTION_HELD) == 0
    assert logs.events("abtest.promotion_resumed")
    assert svc.publish() and svc.last_published == "v000005"


def _keyring(tmp_path: Path) -> Keyring:
    return read_keyring_file(tmp_path / "model-updates.keys")


def test_equal_buckets_never_roll_back(
        kafka: KafkaSettings, synth_log: synthetic.SyntheticLog,
        learner: tuple[LearnerService, LogRecorder]) -> None:
    svc, logs = learner
    v1 = svc.last_published
    v2 = _train_and_publish(kafka, svc, synth_log, 0)
    decisions = _value(abmonitor.DECISIONS.labels("online_worse"))
    rollbacks = _value(abmonitor.ROLLBACKS.labels("published"))
    rng = np.random.default_rng(1001)
    _feed(kafka, svc, _records(synth_log, 0, 2 * 800, rng,
                               [("online", v2, 0.3), ("control", v1, 0.3)]))
    res = svc.monitor.result()
    assert res.n_online == res.n_control == 800
    assert res.decision == "continue" and res.lower < 0 < res.upper
    assert svc.ab_pending is None and svc.ab_hold is None
    assert svc.publish() and svc.last_published == "v000003"     # an ordinary promotion
    assert not logs.events("abtest.decision") and not logs.events("abtest.rollback")
    assert _value(abmonitor.DECISIONS.labels("online_worse")) == decisions
    assert _value(abmonitor.ROLLBACKS.labels("published")) == rollbacks
    updates = [r.record for r in read_all(kafka, "model-updates")]
    assert [u.version for u in updates] == [v1, v2, "v000003"]
    store = Path(svc.s.snapshot_store)
    assert not any("republished_from" in json.loads((store / v / "manifest.json").read_text())
                   for v in svc.store.versions())
