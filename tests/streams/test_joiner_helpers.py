"""Helpers for the joiner tests (no tests here): build events, run `adloop join` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from streams.joiner_core import INPUT_TOPICS, JoinSettings
from streams.kafka_io import read_all
from streams.schemas import (
    Click,
    Conversion,
    Event,
    Feedback,
    Impression,
    OrganicAction,
    OrganicEngagement,
    OrganicSlot,
    SlateItem,
)
from streams.settings import KafkaSettings
from streams.topics import TOPICS, Topics

REPO = Path(__file__).resolve().parents[2]

# a0: cpc bid 2 -> 2 if clicked; a1: cpa bid 5 -> 5 if converted; a2: cpm bid 1000 -> 1.0
SLATE = [
    SlateItem(ad_id="a0", semantic_id=[1, 2, 3], position=0, score=0.9, bid=2.0, bid_type="cpc"),
    SlateItem(ad_id="a1", semantic_id=[1, 2, 4], position=1, score=0.8, bid=5.0, bid_type="cpa"),
    SlateItem(ad_id="a2", semantic_id=[1, 5, 6], position=2, score=0.7, bid=1000.0,
              bid_type="cpm"),
]

# the organic items of a mixed feed, in order (shown as cooking#0, a0, travel#3, a1, a2)
ORGANIC = [
    OrganicSlot(item_id="cooking#0", semantic_id=[7, 1, 1], position=0, score=-1.5),
    OrganicSlot(item_id="travel#3", semantic_id=[7, 2, 9], position=1, score=-2.25),
]


def imp(rid: str, t: float, user: str = "u1", organic: bool = False) -> Impression:
    return Impression(request_id=rid, event_time=t, user_id=user, slate=list(SLATE),
                      model_version="m1", context={"page": "home"},
                      organic=list(ORGANIC) if organic else [])


def engage(eid: str, rid: str, t: float, action: OrganicAction = "view",
           item: str = "cooking#0", dwell_s: float = 0.0,
           user: str = "u1") -> OrganicEngagement:
    return OrganicEngagement(event_id=eid, request_id=rid, user_id=user, item_id=item,
                             action=action, dwell_s=dwell_s, event_time=t)


def topic_of(rec: Event) -> str:
    """The logical topic that carries ``rec``."""
    return next(name for name, spec in TOPICS.items() if type(rec) is spec.record)


def organic(fb: Feedback) -> list[tuple[str, bool, bool, float]]:
    """Per organic item of a list: (item id, viewed, liked, dwell seconds)."""
    return [(o.item_id, o.viewed, o.liked, o.dwell_s) for o in fb.organic]


def click(eid: str, rid: str, t: float, ad: str = "a0", user: str = "u1") -> Click:
    return Click(event_id=eid, request_id=rid, user_id=user, ad_id=ad, event_time=t)


def conv(eid: str, rid: str, t: float, value: float, ad: str = "a1",
         user: str = "u1") -> Conversion:
    return Conversion(event_id=eid, request_id=rid, user_id=user, ad_id=ad, event_time=t,
                      value=value)


def rewards(fb: Feedback) -> list[float]:
    return [round(i.reward, 6) for i in fb.items]


class JoinerProcess:
    """``python -m adloop join`` for one test's topic prefix."""

    def __init__(self, kafka: KafkaSettings, log_path: Path, **settings: Any) -> None:
        self.kafka = kafka
        self.log_path = log_path
        self.settings = {"metrics_port": 0, "session_timeout_s": 6.0,
                         "commit_interval_s": 0.5, **settings}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> JoinerProcess:
        cmd = [sys.executable, "-m", "adloop", "join",
               "--bootstrap-servers", self.kafka.bootstrap_servers,
               "--topic-prefix", self.kafka.topic_prefix]
        for k, v in self.settings.items():
            cmd += ["--" + k.replace("_", "-"), str(v)]
        env = {**os.environ, "ADLOOP_LOG_JSON": "1"}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                     env=env)
        log.close()
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return -9
        return int(self.proc.returncode)

    def diagnostics(self) -> str:
        """The joiner's watermark/lag metrics and the tail of its log."""
        text = self.log_path.read_text(errors="replace")
        out = [text[-3000:]]
        urls = [ln.split()[1] for ln in text.splitlines() if ln.startswith("metrics http")]
        if urls and self.alive():
            try:
                with urllib.request.urlopen(urls[-1] + "/metrics", timeout=5) as r:
                    body = r.read().decode()
                out += [ln for ln in body.splitlines()
                        if ln.startswith(("adloop_join_watermark", "adloop_join_lag",
                                          "adloop_join_events_total"))]
            except OSError as exc:
                out.append(repr(exc))
        return "\n".join(out)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wait_drained(kafka: KafkaSettings, proc: JoinerProcess, timeout_s: float = 60.0) -> None:
    """Wait until the joiner's group has committed the end of every input partition.

    The joiner commits offsets only after its outputs for the records before them are
    flushed (its commit protocol), so from then on everything it will emit for the input
    so far is in Kafka: a barrier for "nothing more (doubled) shows up"."""
    group = kafka.topic_prefix + str(proc.settings.get("app_id", JoinSettings().app_id))
    names = Topics(kafka.topic_prefix)
    deadline = time.monotonic() + timeout_s
    behind: dict[TopicPartition, tuple[int, int]] = {}
    while time.monotonic() < deadline:
        assert proc.alive(), f"joiner exited; log:\n{proc.log_path.read_text()[-3000:]}"
        consumer = KafkaConsumer(**kafka.client_config(), group_id=group,
                                 enable_auto_commit=False)
        try:
            tps = [TopicPartition(names.name(t), p) for t in INPUT_TOPICS
                   for p in sorted(consumer.partitions_for_topic(names.name(t)) or ())]
            at = {tp: (consumer.committed(tp) or 0, end)
                  for tp, end in consumer.end_offsets(tps).items()}
            behind = {tp: v for tp, v in at.items() if v[0] < v[1]}
        finally:
            consumer.close(autocommit=False)
        if tps and not behind:
            return
        time.sleep(0.5)
    raise AssertionError(f"joiner group {group} never committed its input's end: "
                         f"{dict(list(behind.items())[:5])}\n{proc.diagnostics()}")


def wait_for(kafka: KafkaSettings, topic: str, pred: Callable[[list[Any]], bool],
             timeout_s: float = 60.0, proc: JoinerProcess | None = None) -> list[Any]:
    """Read ``topic`` until ``pred(records)`` holds (records are the decoded values)."""
    deadline = time.monotonic() + timeout_s
    recs: list[Any] = []
    while time.monotonic() < deadline:
        recs = [r.record for r in read_all(kafka, topic, timeout_s=5)]
        if pred(recs):
            return recs
        if proc is not None and not proc.alive():
            raise AssertionError(f"joiner exited; log:\n{proc.log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    detail = proc.diagnostics() if proc is not None else ""
    raise AssertionError(f"timed out waiting on {topic}; have {len(recs)} records\n{detail}")
