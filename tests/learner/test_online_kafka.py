"""The learner on the real broker: kill -9 (one process, one rank of a data-parallel group,
or the whole group) and every feedback offset is trained once."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from adloop.stack import ManagedProcess, free_port
from learner import synthetic
from learner.pretrain import PretrainSettings, pretrain
from streams.kafka_io import EventProducer, read_all
from streams.settings import KafkaSettings
from streams.signing import generate_keyring_file, read_keyring_file, verify_update
from streams.topics import Topics


def _ledger(state_dir: Path) -> Counter[tuple[int, int]]:
    seen: Counter[tuple[int, int]] = Counter()
    for seg in sorted((state_dir / "ledger").glob("*.jsonl")):
        for line in seg.read_text().splitlines():
            rec = json.loads(line)
            seen[(rec["p"], rec["o"])] += 1
    return seen


def _end_offsets(kafka: KafkaSettings) -> dict[int, int]:
    topic = Topics(kafka.topic_prefix).feedback
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        return {tp.partition: off for tp, off in c.end_offsets(tps).items()}
    finally:
        c.close()


def _learner(kafka: KafkaSettings, tmp_path: Path, synth_log: synthetic.SyntheticLog,
             make_settings: Callable[..., PretrainSettings], *extra: str
             ) -> tuple[ManagedProcess, dict[int, int]]:
    """A pretrained model, 900 feedback records on ``kafka`` and an ``adloop learn``
    process (not started) that checkpoints often; also the end offset per partition."""
    pre = tmp_path / "pretrain"
    pretrain(make_settings(pre, steps=20), synth_log.ads, synth_log.feedback)
    producer = EventProducer(kafka)
    for ad in synth_log.ads:
        producer.send("ads", ad)
    for fb in synth_log.feedback[:900]:
        producer.send("feedback", fb)
    producer.flush()
    producer.close()
    ends = _end_offsets(kafka)
    assert sum(ends.values()) == 900

    state, store, port = tmp_path / "state", tmp_path / "store", free_port()
    generate_keyring_file(tmp_path / "model-updates.keys")   # as the stack writes one
    proc = ManagedProcess("learn", [
        "learn", "--bootstrap-servers", kafka.bootstrap_servers,
        "--topic-prefix", kafka.topic_prefix, "--init-run-dir", str(pre),
        "--state-dir", str(state), "--snapshot-store", str(store), "--batch-lists", "16",
        "--max-wait-s", "0.1", "--checkpoint-every-s", "0.3", "--snapshot-every-updates", "8",
        "--snapshot-every-s", "2", "--holdout-every", "10", "--threads", "1",
        "--metrics-port", str(port), *extra], tmp_path / "logs",
        ready_url=f"http://127.0.0.1:{port}/readyz",
        env={"ADLOOP_UPDATE_KEYS_FILE": str(tmp_path / "model-updates.keys")})
    return proc, ends


def _assert_trained_exactly_once(kafka: KafkaSettings, proc: ManagedProcess, state: Path,
                                 ends: dict[int, int]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and sum(_ledger(state).values()) < 900:
        time.sleep(1.0)
    assert proc.stop() == 0, proc.log_tail()

    seen = _ledger(state)
    expected = {(p, o) for p, end in ends.items() for o in range(end)}
    assert set(seen) == expected, f"missing {sorted(expected - set(seen))[:10]}"
    doubled = [k for k, v in seen.items() if v > 1]
    assert not doubled, f"trained twice: {doubled[:10]}"

    updates = [r.record for r in read_all(kafka, "model-updates")]
    versions = sorted({u.version for u in updates})
    assert len(versions) >= 2, versions
    assert all(u.sha256 and u.uri.startswith("file://") for u in updates)
    assert max(u.data_watermark for u in updates) > 0
    # every announcement is signed with the learner's keyring
    keyring = read_keyring_file(state.parent / "model-updates.keys")
    assert [verify_update(u, keyring) for u in updates] == [None] * len(updates)


def test_learner_kill9_restarts_train_every_feedback_offset_exactly_once(
        kafka: KafkaSettings, tmp_path: Path, synth_log: synthetic.SyntheticLog,
        make_settings: Callable[..., PretrainSettings]) -> None:
    proc, ends = _learner(kafka, tmp_path, synth_log, make_settings)
    rng = random.Random(7)
    proc.start().wait_ready(180)
    for _ in range(2):                        # kill -9 twice at random points
        time.sleep(rng.uniform(1.0, 4.0))     # when to kill (seeded), not a wait
        proc.kill()
        proc.start().wait_ready(180)
    _assert_trained_exactly_once(kafka, proc, tmp_path / "state", ends)


def _ranks(launcher: ManagedProcess) -> dict[int, int]:
    """rank -> pid of the rank processes ``adloop learn --world-size N`` started."""
    pid = launcher.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ranks = {}
    for child in children:
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for kv in env:
            if kv.startswith(b"ADLOOP_LEARN_RANK="):
                ranks[int(kv.split(b"=", 1)[1])] = int(child)
    return ranks


def test_two_rank_learner_kill9_of_one_rank_then_of_all_trains_every_offset_exactly_once(
        kafka: KafkaSettings, tmp_path: Path, synth_log: synthetic.SyntheticLog,
        make_settings: Callable[..., PretrainSettings]) -> None:
    proc, ends = _learner(kafka, tmp_path, synth_log, make_settings, "--world-size", "2",
                          "--dist-timeout-s", "30")
    rng = random.Random(7)
    proc.start().wait_ready(180)
    for victim in (1, 0):                     # kill -9 one rank: the group goes down
        time.sleep(rng.uniform(1.0, 3.0))     # when to kill (seeded), not a wait
        ranks = _ranks(proc)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[victim], signal.SIGKILL)
        assert proc.proc is not None
        t0 = time.monotonic()
        rc = proc.proc.wait(60)               # the other rank notices, the launcher exits
        assert rc != 0, proc.log_tail()
        assert time.monotonic() - t0 < 45, "the surviving rank hung"
        proc.start().wait_ready(180)
    time.sleep(rng.uniform(1.0, 3.0))         # when to kill (seeded), not a wait
    os.killpg(proc.pid, signal.SIGKILL)       # kill -9 the launcher and every rank at once
    assert proc.proc is not None
    proc.proc.wait(30)
    proc.start().wait_ready(180)
    _assert_trained_exactly_once(kafka, proc, tmp_path / "state", ends)
    log = proc.log_path.read_text()
    assert '"learner.rank_started"' in log and "learner.group_stopped" in log
