"""Topic names, partition counts and configs: the Kafka contracts in one place.

Keys are the user id unless stated, so one user's events stay ordered in one
partition and impressions, clicks, conversions and feedback are co-partitioned
(same partition count, same key, same default partitioner).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.schemas import (
    Ad,
    AdStats,
    Click,
    Conversion,
    DeadLetter,
    Event,
    Feedback,
    Impression,
    ModelUpdate,
    OrganicEngagement,
    OrganicItem,
)

DAY_MS = 24 * 3600 * 1000
EVENT_PARTITIONS = 4
"""impressions, clicks, conversions, organic engagements and feedback share this count
(co-partitioning)."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its logical name, record type, partitioning and broker configs."""

    name: str
    record: type[Event]
    partitions: int
    key: str
    configs: dict[str, str] = field(default_factory=dict)


_EVENTS = {"retention.ms": str(7 * DAY_MS), "max.message.bytes": str(2 * 1024 * 1024)}
_COMPACTED = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0",
              "max.message.bytes": str(2 * 1024 * 1024)}

TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        TopicSpec("ads", Ad, 1, "ad id", dict(_COMPACTED)),
        TopicSpec("impressions", Impression, EVENT_PARTITIONS, "user id", dict(_EVENTS)),
        TopicSpec("clicks", Click, EVENT_PARTITIONS, "user id", dict(_EVENTS)),
        TopicSpec("conversions", Conversion, EVENT_PARTITIONS, "user id", dict(_EVENTS)),
        TopicSpec("feedback", Feedback, EVENT_PARTITIONS, "user id", dict(_EVENTS)),
        TopicSpec("organic-items", OrganicItem, 1, "item id", dict(_COMPACTED)),
        TopicSpec("organic-engagements", OrganicEngagement, EVENT_PARTITIONS, "user id",
                  dict(_EVENTS)),
        TopicSpec("model-updates", ModelUpdate, 1, "model name", dict(_COMPACTED)),
        # Compacted (latest value per window) and deleted after 7 days (old windows).
        TopicSpec("ad-stats", AdStats, 1, "dimension:id:window:window_start",
                  {**_COMPACTED, "cleanup.policy": "compact,delete",
                   "retention.ms": str(7 * DAY_MS)}),
        # Dead letters carry the raw bytes base64-encoded, so allow larger records.
        TopicSpec("dlq", DeadLetter, 1, "source topic",
                  {"retention.ms": str(14 * DAY_MS), "max.message.bytes": str(4 * 1024 * 1024)}),
    )
}


class Topics:
    """Physical topic names under a prefix (``""`` in production, one per test in tests)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def name(self, logical: str) -> str:
        if logical not in TOPICS:
            raise KeyError(f"unknown topic {logical!r}; known: {sorted(TOPICS)}")
        return self.prefix + logical

    def logical(self, physical: str) -> str:
        """The logical name of a physical topic (for metric labels)."""
        if self.prefix and physical.startswith(self.prefix):
            physical = physical[len(self.prefix):]
        return physical

    def spec(self, logical: str) -> TopicSpec:
        return TOPICS[logical]

    @property
    def ads(self) -> str:
        return self.name("ads")

    @property
    def impressions(self) -> str:
        return self.name("impressions")

    @property
    def clicks(self) -> str:
        return self.name("clicks")

    @property
    def conversions(self) -> str:
        return self.name("conversions")

    @property
    def feedback(self) -> str:
        return self.name("feedback")

    @property
    def model_updates(self) -> str:
        return self.name("model-updates")

    @property
    def ad_stats(self) -> str:
        return self.name("ad-stats")

    @property
    def dlq(self) -> str:
        return self.name("dlq")


def create_topics(bootstrap_servers: str, prefix: str = "",
                  replication_factor: int = 1,
                  security: Mapping[str, Any] | None = None,
                  wait_s: float = 30.0) -> dict[str, str]:
    """Create every topic that does not exist yet. Idempotent.

    ``security``: TLS/SASL client arguments (:meth:`KafkaSettings.security_config`).
    Returns ``{physical name: "created" | "exists"}`` once every topic's partitions
    have a leader in the cluster metadata (:func:`wait_for_topics`, at most ``wait_s``;
    0 returns at once), so a client started next finds them on its first lookup.
    """
    topics = Topics(prefix)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="adloop-topics",
                             **(security or {}))
    try:
        existing = set(admin.list_topics())
        result: dict[str, str] = {}
        new: list[NewTopic] = []
        for logical, spec in TOPICS.items():
            physical = topics.name(logical)
            if physical in existing:
                result[physical] = "exists"
                continue
            new.append(NewTopic(physical, spec.partitions, replication_factor,
                                topic_configs=dict(spec.configs)))
            result[physical] = "created"
        for topic in new:  # one at a time so a concurrent creator only races per topic
            try:
                admin.create_topics([topic])
            except TopicAlreadyExistsError:
                result[topic.name] = "exists"
        if wait_s > 0:
            _wait_for_leaders(admin, {topics.name(t): spec.partitions
                                      for t, spec in TOPICS.items()}, wait_s)
        return result
    finally:
        admin.close()


class TopicsNotReadyError(TimeoutError):
    """Topics whose partitions have no leader in the metadata within the bound."""


def wait_for_topics(bootstrap_servers: str, names: Iterable[str], timeout_s: float = 30.0,
                    security: Mapping[str, Any] | None = None) -> None:
    """Return once every partition of every topic in ``names`` (physical names) has a
    leader in the cluster metadata; :class:`TopicsNotReadyError` after ``timeout_s``."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="adloop-topics",
                             **(security or {}))
    try:
        _wait_for_leaders(admin, dict.fromkeys(names, 0), timeout_s)
    finally:
        admin.close()


def _wait_for_leaders(admin: KafkaAdminClient, partitions: Mapping[str, int],
                      timeout_s: float) -> None:
    """``partitions``: physical name -> partitions expected (0: any number, at least 1)."""
    deadline = time.monotonic() + timeout_s
    pending = dict(partitions)
    while True:
        for described in admin.describe_topics(sorted(pending)):
            parts = described.get("partitions") or []
            want = pending.get(described["name"])
            if (want is not None and described.get("error_code", 0) == 0 and parts
                    and len(parts) >= max(want, 1)
                    and all(p.get("error_code", 0) == 0 and p.get("leader_id", -1) >= 0
                            for p in parts)):
                del pending[described["name"]]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TopicsNotReadyError(
                f"no leader in the metadata after {timeout_s:.0f}s for {sorted(pending)}")
        time.sleep(0.1)  # poll interval of a bounded wait
