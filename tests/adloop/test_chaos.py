"""A CI-sized subset of ``bench/chaos.py``: faults during live traffic, then the ledger.

The server and the learner are killed with ``kill -9`` while traffic (mixed feeds: ads
and organic items) runs, a burst of malformed records hits every input topic, poison
bytes (invalid UTF-8, tombstones, non-UTF-8 keys, wrong field types) hit every topic a
process reads (the organic ones included), and a corrupt snapshot is announced; no
process exits on its own; after tail traffic closes every attribution window, every
event the traffic caused is accounted for: nothing lost, nothing doubled, no final list
with a wrong reward or organic engagement.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from adloop.chaos import ChaosRun, ChaosSettings

pytestmark = pytest.mark.kafka

FAULTS = ("kill_server", "kill_learner", "malformed_burst", "poison_bytes", "corrupt_snapshot")


def test_faults_during_live_traffic_lose_and_double_nothing(kafka_broker: str,
                                                             tmp_path: Path) -> None:
    s = ChaosSettings(out=tmp_path / "chaos", faults=",".join(FAULTS), load=False,
                      bootstrap_servers=kafka_broker,
                      topic_prefix=f"t-chaos-{uuid.uuid4().hex[:6]}.", rate=6.0,
                      phase_s=6.0, log_requests=400, pretrain_steps=10, n_users=150,
                      n_ads=60, malformed_per_topic=4)
    result = ChaosRun(s).run()
    rows = {r["fault"]: r for r in result["rows"]}
    assert set(rows) == set(FAULTS)
    for name, r in rows.items():
        assert "error" not in r["detail"], (name, r["detail"])
        assert r["lost"] == 0 and r["doubled"] == 0 and r["wrong"] == 0, (name, r)
        assert r["untrained"] == 0, (name, r)
        assert r["accounted"] == r["events_in"] > 0, (name, r)
        assert r["recovery_s"] is not None, (name, r)
        assert r["process_exits"] == 0, (name, r, result["exits"])
    # organic engagements of the mixed feeds were accounted in every phase's ledger
    assert sum(r["organic_engagements"] for r in rows.values()) > 0, rows
    # every malformed record (4 per input topic, 7 topics) is in the dlq with a reason
    assert rows["malformed_burst"]["dead_lettered"] >= 28
    # 6 poison records on each of 8 topics, every one dead-lettered (but the two
    # tombstones on ads and on organic-items: deletions there); the server goes on
    # following ads, reads past the poison on organic-items and serves a snapshot
    # announced after the poison
    poison = rows["poison_bytes"]
    assert poison["detail"]["poison_records"] == 44
    assert poison["detail"]["tombstones_as_deletions"] == {"ads": 2, "organic-items": 2}
    assert poison["detail"]["server_skipped_organic_items"] >= 4
    assert poison["dead_lettered"] >= 44
    assert poison["detail"]["catalog_ads"][1] > poison["detail"]["catalog_ads"][0]
    assert poison["detail"]["response_model_is_new"], poison["detail"]
    assert result["exits"] == []
    assert rows["corrupt_snapshot"]["detail"]["serving_after"] \
        == rows["corrupt_snapshot"]["detail"]["serving_before"]
    assert all(code == 0 for code in result["exit_codes"].values()), result["exit_codes"]
