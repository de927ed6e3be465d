"""The whole loop on the real broker: ``adloop demo`` in a short configuration.

Every process takes part: the server answers the traffic (ads and organic items, a
mixed feed) for two A/B buckets and logs impressions, the joiner turns them and the
users' clicks, conversions and organic engagements into feedback, the learner trains on
it and publishes new snapshots, and the server swaps the online bucket to them while
traffic runs; the control bucket keeps the pretrained model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_closes_the_loop_feedback_reaches_the_learner_and_new_snapshots_are_served(
        tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ, ADLOOP_LOG_JSON="1", HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, "-m", "adloop", "demo", "--minutes", "0.75", "--rate", "10",
         "--log-requests", "800", "--pretrain-steps", "60", "--encoder", "hashing",
         "--n-users", "200", "--out", str(out), "--metrics-port", "0",
         "--organic-slots", "3", "--shadow-frozen"],
        capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outcomes"].get("ok", 0) > 100
    assert summary["feedback_lists"] > 0           # joiner emitted feedback
    assert summary["lists_trained"] > 0            # ... the learner trained on it
    assert summary["snapshots_published"] >= 2     # ... and published new snapshots
    assert len(summary["model_versions_served"]) >= 2, summary["model_versions_served"]
    assert summary["server_swaps_ok"] >= 2         # ... which the server swapped in
    assert summary["snapshots_refused"] == 0
    # the supervisor watched every process, and none had to be restarted
    assert summary["process_restarts"] == {"join": 0, "stats": 0, "learn": 0, "serve": 0}
    # a frozen copy of the pretrained model answered every request in shadow
    assert summary["frozen_rpm_last_quarter"] > 0
    assert summary["online_over_frozen_last_quarter"] == round(
        summary["rpm_last_quarter"] / summary["frozen_rpm_last_quarter"], 4)
    # the live A/B test: both buckets served, the control by the pinned first version
    assert summary["control_version"] == summary["model_versions_served"][0]
    assert summary["requests_online"] > 20 and summary["requests_control"] > 20
    assert summary["requests_online"] + summary["requests_control"] + \
        summary["requests_outside_test"] == summary["outcomes"]["ok"]
    assert summary["online_rpm_whole_run"] > 0 and summary["control_rpm_whole_run"] > 0
    assert summary["online_over_control_whole_run"] == round(
        summary["online_rpm_whole_run"] / summary["control_rpm_whole_run"], 4)
    low, high = summary["ab_rpm_diff_interval"]
    assert low <= summary["ab_rpm_diff"] <= high
    assert summary["live_test_decisions"].keys() == {"online_worse", "online_better"}
    assert "last quarter: online" in res.stdout and "vs control" in res.stdout
    assert "pretraining: step" in res.stdout      # progress while pretraining
    # beyond accuracy of the impressions served and of the shadow's slates
    for key in ("catalogue_coverage", "slate_diversity", "sid_diversity", "novelty_unseen",
                "personalization"):
        assert 0.0 < summary[key] <= 1.0 and 0.0 < summary[f"frozen_{key}"] <= 1.0, key
    assert summary["novelty_bits"] > 0 and summary["frozen_novelty_bits"] > 0
    # mixed feeds: three organic items per request, placed by the served model, their
    # views, likes and dwell produced and measured
    assert summary["organic_items_shown"] == 3 * summary["outcomes"]["ok"]
    assert 0.0 < summary["organic_like_rate"] < summary["organic_view_rate"] < 1.0
    assert summary["organic_dwell_s_per_item"] > 0
    assert 0.0 < summary["organic_engagement_last_quarter"] < 2.0
    assert summary["organic_engagements_joined"] > 0     # through Kafka and the joiner
    assert (out / "report.md").exists() and (out / "rpm.png").exists()
    assert "stopping processes" in res.stdout
    # the console keeps to steps, progress and the summary; the logs are in files
    assert not [line for line in res.stdout.splitlines() if line.lstrip().startswith("{")]
    assert "broker.ready" not in res.stdout + res.stderr
    assert f"logs: {out / 'logs' / 'demo.log'}" in res.stdout
    assert "broker.ready" in (out / "logs" / "demo.log").read_text()
    assert (out / "stack" / "logs" / "stats.log").exists()
