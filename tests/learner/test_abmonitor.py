"""The bucket monitor (learner/abmonitor.py) without Kafka: what counts, per-version
tests and rollback candidates, epochs, and its checkpoint round trip."""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from learner.abmonitor import REQUESTS, BucketMonitor
from streams.schemas import Feedback, FeedbackItem


def _fb(i: int, bucket: str, version: str, clicks: list[bool], kind: str = "final",
        converted: bool = False) -> Feedback:
    items = [FeedbackItem(ad_id=f"a{j}", semantic_id=[], position=j, score=0.0, bid=1.0,
                          bid_type="cpc", clicked=c, converted=c and converted and j == 0,
                          reward=float(c)) for j, c in enumerate(clicks)]
    t = 1000.0 + i
    return Feedback(request_id=f"r{i}", user_id=f"u{i % 97}", kind=kind,  # type: ignore[arg-type]
                    revision=0, impression_time=t, event_time=t + 60, elapsed_s=60.0,
                    window_closed=kind == "final", model_version=version, items=items,
                    bucket=bucket)


def _stream(monitor: BucketMonitor, rng: np.random.Generator, start: int, n: int,
            plan: list[tuple[str, str, float]]) -> None:
    for i in range(n):
        bucket, version, p = plan[i % len(plan)]
        monitor.observe(_fb(start + i, bucket, version, list(rng.random(3) < p)))


def test_only_final_records_count_and_figures_are_per_bucket() -> None:
    m = BucketMonitor(min_requests=2)
    none_before = REQUESTS.labels("none")._value.get()
    m.observe(_fb(0, "online", "v2", [True, False, False], kind="provisional"))
    m.observe(_fb(1, "online", "v2", [True, True, False, False], converted=True))
    m.observe(_fb(2, "control", "v1", [False, False]))
    m.observe(_fb(3, "", "v1", [True]))
    assert REQUESTS.labels("none")._value.get() == none_before + 1
    on, ctl = m.totals["online"], m.totals["control"]
    assert (on.requests, on.revenue, on.items, on.clicks, on.conversions) == (1, 2.0, 4, 2, 1)
    assert on.rpm == 2000.0 and on.ctr == 0.5 and on.cvr == 0.5
    assert ctl.requests == 1 and ctl.rpm == 0.0 and math.isnan(ctl.cvr)
    assert m.control_version == "v1" and m.current_online == "v2"


def test_rollback_candidates_rank_versions_not_found_worse_and_fall_back_to_control() -> None:
    rng = np.random.default_rng(1000)
    m = BucketMonitor(min_requests=100)
    _stream(m, rng, 0, 600, [("online", "v2", 0.4), ("control", "v1", 0.3)])
    _stream(m, rng, 600, 600, [("online", "v3", 0.32), ("control", "v1", 0.3)])
    _stream(m, rng, 1200, 600, [("online", "v4", 0.02), ("control", "v1", 0.3)])
    assert m.verdict("v4") == "online_worse"
    cands = m.rollback_candidates(exclude=set())
    # best estimate first; v4 was found worse; control (estimate 0) where it ranks
    assert [c.version for c in cands] == ["v2", "v3", "v1"]
    assert cands[0].diff > cands[1].diff > 0 and cands[0].n_control >= 100
    assert [c.version for c in m.rollback_candidates({"v2", "v3"})] == ["v1"]
    assert {"v1", "v2"} <= m.protected()


def test_after_a_restart_only_the_accepted_versions_and_later_control_count() -> None:
    rng = np.random.default_rng(1001)
    m = BucketMonitor(min_requests=100)
    _stream(m, rng, 0, 100, [("online", "v2", 0.3), ("control", "v1", 0.3)])
    m.restart({"v5"})
    assert m.epoch == 1 and m.totals["online"].requests == 0
    _stream(m, rng, 100, 40, [("control", "v1", 0.3), ("online", "v2", 0.3)])
    assert m.test.online.n == 0 and m.test.control.n == 0    # nothing of v5 served yet
    _stream(m, rng, 140, 40, [("online", "v5", 0.3), ("control", "v1", 0.3)])
    assert m.test.online.n == 20 and m.test.control.n == 20
    m.announced("v6")
    m.observe(_fb(200, "online", "v6", [True]))
    assert m.test.online.n == 21 and m.epoch_versions == ["v5", "v6"]


def test_the_monitor_state_survives_a_checkpoint_round_trip() -> None:
    rng = np.random.default_rng(1002)
    m = BucketMonitor(min_requests=100)
    _stream(m, rng, 0, 400, [("online", "v2", 0.1), ("control", "v1", 0.4)])
    m.restart({"v3"})
    _stream(m, rng, 400, 400, [("online", "v3", 0.05), ("control", "v1", 0.4)])
    assert m.new_decision() is not None
    buf = io.BytesIO()
    torch.save({"abtest": m.state()}, buf)
    buf.seek(0)
    st = torch.load(buf, weights_only=True)["abtest"]   # as the learner loads its state
    back = BucketMonitor(min_requests=100)
    back.load(st)
    assert back.result() == m.result()
    assert back.new_decision() is None                   # already reported before
    assert back.accept == {"v3"} and back.epoch == 1
    assert [c.version for c in back.rollback_candidates(set())] == \
        [c.version for c in m.rollback_candidates(set())]
