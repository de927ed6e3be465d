"""Off-policy estimators against a worked example, and the whole bring-your-own-logs
path on the checked-in logged-bandit file: replay -> join -> import -> evaluate --offline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from adloop import cli
from adloop.offpolicy import (
    LoggedItems,
    beyond_of_slates,
    doubly_robust,
    estimate,
    ips,
    on_policy,
    snips,
    write_served,
)
from streams.schemas import Ad, Feedback, FeedbackItem
from streams.settings import KafkaSettings
from tests.streams.test_joiner_helpers import JoinerProcess, wait_for
from traffic.recorded import read_recorded

LOG = Path(__file__).resolve().parents[1] / "data" / "logged_bandit.jsonl"


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _worked_example(target: list[float]) -> LoggedItems:
    """Impression 0 logged [a (p .5, r 1), b (p .5, r 0)], impression 1 logged
    [c (p .25, r 2)]; r̂: a .5, b .2, c 1; the target serves [a, c] and [c]."""
    return LoggedItems(impression=np.array([0, 0, 1]), propensity=np.array([0.5, 0.5, 0.25]),
                       target=np.array(target), reward=np.array([1.0, 0.0, 2.0]),
                       predicted=np.array([0.5, 0.2, 1.0]), direct=np.array([1.5, 1.0]))


def test_estimators_match_the_worked_example_by_hand() -> None:
    agg = _worked_example([1.0, 0.0, 1.0]).per_impression()
    assert ips(agg) == pytest.approx((2 * 1 + 0 + 4 * 2) / 2)                 # 5.0
    assert snips(agg) == pytest.approx(10 / 6 * 3 / 2)                        # 2.5
    assert doubly_robust(agg) == pytest.approx((1.5 + 1.0 + 2 * 0.5 + 4 * 1.0) / 2)  # 3.75
    assert on_policy(agg) == pytest.approx(1.5)


def test_ips_of_the_logging_policy_against_itself_is_its_on_policy_value() -> None:
    rng = np.random.default_rng(3)
    n, n_ads = 400, 24
    imp = np.repeat(np.arange(n), 3)
    p = np.full(3 * n, 1 / n_ads)                  # uniform logging, per position
    r = (rng.random(3 * n) < 0.1).astype(float)
    items = LoggedItems(imp, p, p.copy(), r, np.zeros(3 * n), np.zeros(n))
    agg = items.per_impression()
    assert ips(agg) == pytest.approx(on_policy(agg)) == pytest.approx(r.sum() / n)
    assert snips(agg) == pytest.approx(on_policy(agg))
    assert doubly_robust(agg) == pytest.approx(on_policy(agg))
    res = estimate(items, samples=100)
    assert res["ips"]["low"] <= res["ips"]["value"] <= res["ips"]["high"]


def test_bring_your_own_logs_replay_join_import_evaluate(
        tmp_path: Path, kafka: KafkaSettings, capsys: pytest.CaptureFixture[str]) -> None:
    entries = list(read_recorded(LOG, "stop"))
    n_imp = sum(e.kind == "impression" for e in entries)
    n_click = sum(e.kind == "click" for e in entries)
    assert cli.main(["replay", "--from", str(LOG), "--speed", "0", "--on-error", "stop",
                     "--bootstrap-servers", kafka.bootstrap_servers,
                     "--topic-prefix", kafka.topic_prefix]) == 0
    replayed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert replayed["produced"]["impression"] == n_imp and replayed["missing"] == {}
    joiner = JoinerProcess(kafka, tmp_path / "join.log").start()
    try:
        fb = wait_for(kafka, "feedback", lambda rs: sum(
            isinstance(f, Feedback) and f.kind == "final" for f in rs) >= n_imp,
            timeout_s=120, proc=joiner)
    finally:
        joiner.stop()
    finals = [f for f in fb if f.kind == "final"]
    assert sum(i.clicked for f in finals for i in f.items) == n_click
    assert all(i.propensity is not None for f in finals for i in f.items)

    run_dir = tmp_path / "run"
    assert cli.main(["import", "--from", str(LOG), "--run-dir", str(run_dir),
                     "--encoder", "hashing", "--level-sizes", "8,4", "--industry-size", "4",
                     "--goal-size", "4", "--advertiser-size", "4", "--suffix-size", "4",
                     "--d-model", "16", "--n-layer", "2", "--n-enc-layer", "1",
                     "--history-len", "4", "--steps", "30", "--batch-size", "32",
                     "--no-progress", "--checkpoint-every", "0", "--threads", "1"]) == 0
    imported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert imported["context_features"] == ["device", "segment"]

    served = tmp_path / "ope" / "served.jsonl"
    assert cli.main(["evaluate", "--offline", "--from", str(LOG),
                     "--snapshot", imported["snapshot"], "--beam-width", "16",
                     "--bootstrap-samples", "50", "--out", str(served)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # --out: the same summary, then every logged impression with both slates
    lines = [json.loads(line) for line in served.read_text().splitlines()]
    assert lines[0] == {"type": "summary", **out}
    logged = {e.record.request_id: e.record for e in entries  # type: ignore[union-attr]
              if e.kind == "impression"}
    rows = lines[1:]
    assert [r["type"] for r in rows] == ["impression"] * n_imp
    assert {r["request_id"] for r in rows} == set(logged)
    for r in rows:
        imp = logged[r["request_id"]]
        shown = sorted(imp.slate, key=lambda it: it.position)  # type: ignore[union-attr]
        assert r["logged_slate"] == [it.ad_id for it in shown]
        assert r["logged_propensities"] == [it.propensity for it in shown]
        assert r["user_id"] == imp.user_id  # type: ignore[union-attr]
        assert len(r["target_slate"]) == len(shown)
    assert [r["impression_time"] for r in rows] == sorted(r["impression_time"] for r in rows)
    # an item counts for the estimators where the target serves it at its logged position
    matched = sum(a == b for r in rows for a, b in zip(r["logged_slate"], r["target_slate"],
                                                       strict=True))
    assert matched == out["matched_items"]
    v = out["value_per_impression"]
    assert out["impressions"] == n_imp
    assert v["logging_on_policy"]["value"] == pytest.approx(n_click * 1.0 / n_imp)
    for name in ("ips", "snips", "dr"):
        assert np.isfinite(v[name]["value"]) and v[name]["low"] <= v[name]["high"]
    beyond = out["beyond_accuracy"]
    assert set(beyond) == {"catalogue_coverage", "sid_diversity", "novelty_unseen",
                           "novelty_bits", "personalization"}
    assert 0.0 < beyond["catalogue_coverage"] <= 1.0
    assert 0.0 <= beyond["sid_diversity"] <= 1.0 and 0.0 <= beyond["novelty_unseen"] <= 1.0


def _final(rid: str, user: str, t: float, shown: list[str]) -> Feedback:
    return Feedback(request_id=rid, user_id=user, kind="final", revision=0,
                    impression_time=t, event_time=t, elapsed_s=0.0, window_closed=True,
                    items=[FeedbackItem(ad_id=a, semantic_id=[0], position=i, score=0.0,
                                        bid=1.0, bid_type="cpc", clicked=a == "a")
                           for i, a in enumerate(shown)])


def test_beyond_accuracy_of_the_snapshot_slates_on_the_log_by_hand() -> None:
    # given out of time order: the log shows u1 [a] at t=0, u2 [b] at 1, u1 [b] at 2
    finals = [_final("r2", "u1", 2, ["b"]), _final("r0", "u1", 0, ["a"]),
              _final("r1", "u2", 1, ["b"])]
    slates = [["a", "c"], ["a", "b"], ["b", "c"]]  # the snapshot's, per final list
    ads = [Ad(ad_id=x, advertiser_id="adv", industry="retail", bid_type="cpc",
              conversion_goal="purchase", bid=1.0, budget=10.0, title=x, description=x,
              created_time=0.0, event_time=0.0) for x in ("a", "b", "c", "d")]
    out = beyond_of_slates(finals, slates, ads, seed=0)
    # in time order: u1 [a b] (both new), u2 [b c] (new), u1 [a c]: a was logged -> c new
    assert out["novelty_unseen"] == round(5 / 6, 4)
    assert out["catalogue_coverage"] == 0.75                       # a b c of 4
    # u1-u2 pairs: [a b]-[b c] 1/3, [b c]-[a c] 1/3
    assert out["personalization"] == round(1 - 1 / 3, 4)
    # log clicks: a once of 3 logged impressions over {a, b}: a -log2(2/4), b c -log2(1/4)
    assert out["novelty_bits"] == round((1 + 2 + 2 + 2 + 1 + 2) / 6, 4)
    assert "sid_diversity" not in out                               # no snapshot given


def test_out_lines_are_the_summary_then_each_impression_with_both_slates(
        tmp_path: Path) -> None:
    finals = [_final("r2", "u1", 20.0, ["c", "a"]), _final("r1", "u2", 10.0, ["a", "b"])]
    finals[1].items[0].propensity, finals[1].items[1].propensity = 0.5, 0.25
    finals[1].items[0].reward = 1.0
    path = tmp_path / "out" / "served.jsonl"
    assert write_served(path, {"impressions": 2}, finals, [["b", "c"], ["a", "d"]]) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"type": "summary", "impressions": 2},
        {"type": "impression", "request_id": "r1", "user_id": "u2", "impression_time": 10.0,
         "logged_slate": ["a", "b"], "logged_propensities": [0.5, 0.25],
         "logged_rewards": [1.0, 0.0], "target_slate": ["a", "d"]},
        {"type": "impression", "request_id": "r2", "user_id": "u1", "impression_time": 20.0,
         "logged_slate": ["c", "a"], "logged_propensities": [None, None],
         "logged_rewards": [0.0, 0.0], "target_slate": ["b", "c"]},
    ]
    assert not path.with_name("served.jsonl.tmp").exists()
    with pytest.raises(ValueError, match="2 impressions but 1 target slates"):
        write_served(path, {}, finals, [["a"]])
