"""Dashboards, recording rules and alerts for adloop, as code.

One module holds every PromQL expression adloop's operators look at: the
recording rules (headline figures), the alert rules, and the panels of the five
Grafana dashboards (overview, serving, streams, learner, ad statistics), built with
grafana-foundation-sdk. ``python -m deploy.observability.dashboards`` writes

- ``deploy/grafana/dashboards/adloop-*.json``  (provisioned by compose.yaml),
- ``deploy/prometheus/rules/adloop-recording.yml`` and ``adloop-alerts.yml``,
- ``docs/metrics.md`` (the metric inventory, from :mod:`.inventory`);

``--check`` exits 1 when a committed file differs from what the code generates.
:func:`panel_queries` and :func:`recording_rules` feed the real-Prometheus test.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from grafana_foundation_sdk.builders import common as gcommon
from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus as gprom
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from deploy.observability.inventory import BY_NAME, render_markdown

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
METRICS_DOC = ROOT / "docs" / "metrics.md"

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="prometheus")
"""The provisioned datasource (deploy/grafana/provisioning/datasources/prometheus.yml)."""

# --------------------------------------------------------------------------------------
# Recording rules: the headline figures, named level:metric:operations.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str
    may_be_empty: bool = False
    """True when a healthy stack can legitimately have no series (e.g. no errors yet)."""


def _quantile(q: float, metric: str, window: str, by: str = "job") -> str:
    return (f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate({metric}_bucket[{window}])))")


P50_LATENCY = "adloop:server_request_duration_seconds:p50_rate1m"
P99_LATENCY = "adloop:server_request_duration_seconds:p99_rate1m"
REQUEST_RATE = "adloop:server_requests:rate1m"
ERROR_RATIO = "adloop:server_errors:ratio_rate5m"
TRAFFIC_P99 = "adloop:traffic_request_latency_seconds:p99_rate1m"
FRESHNESS_P95 = "adloop:learner_freshness_seconds:p95_rate15m"
RPM = "adloop:traffic_revenue_per_mille:rate5m"
LAG = "adloop:consumer_lag_records:sum"
DEAD_LETTER_RATE = "adloop:dead_letters:rate5m"
PRODUCED_RATE = "adloop:produced_records:rate1m"
CONSUMED_RATE = "adloop:consumed_records:rate1m"

RECORDING_RULES: tuple[RecordingRule, ...] = (
    RecordingRule(P50_LATENCY, _quantile(0.5, "adloop_server_request_duration_seconds", "1m")),
    RecordingRule(P99_LATENCY, _quantile(0.99, "adloop_server_request_duration_seconds", "1m")),
    RecordingRule(REQUEST_RATE,
                  "sum by (job, code) (rate(adloop_server_requests_total[1m]))"),
    RecordingRule(ERROR_RATIO,
                  'sum by (job) (rate(adloop_server_requests_total{code=~"5.."}[5m]))\n'
                  "/\nsum by (job) (rate(adloop_server_requests_total[5m]))",
                  may_be_empty=True),
    RecordingRule(TRAFFIC_P99,
                  _quantile(0.99, "adloop_traffic_request_latency_seconds", "1m")),
    RecordingRule(FRESHNESS_P95, _quantile(0.95, "adloop_learner_freshness_seconds", "15m")),
    RecordingRule(RPM, "1000 * sum by (job) (rate(adloop_traffic_revenue_total[5m]))\n"
                       "/\nsum by (job) (rate(adloop_traffic_impressions_total[5m]))"),
    # The joiner reports its lag as adloop_join_lag_records; its group is its job.
    RecordingRule(LAG, "sum by (job, group, topic) (adloop_consumer_lag_records)\nor\n"
                       "sum by (job, group, topic) (label_replace(adloop_join_lag_records, "
                       "\"group\", \"$1\", \"job\", \"(.*)\"))"),
    RecordingRule(DEAD_LETTER_RATE,
                  "sum by (job, topic, reason) (rate(adloop_dead_letters_total[5m]))",
                  may_be_empty=True),
    RecordingRule(PRODUCED_RATE,
                  "sum by (job, topic) (rate(adloop_produced_records_total[1m]))"),
    RecordingRule(CONSUMED_RATE,
                  "sum by (job, topic) (rate(adloop_consumed_records_total[1m]))"),
)

# --------------------------------------------------------------------------------------
# Alerts. Every alert has firing and not-firing cases in deploy/prometheus/tests/.
# --------------------------------------------------------------------------------------

FRESHNESS_TARGET_S = 600
"""Freshness p95 target, event-time seconds from newest trained event to snapshot."""
NO_SNAPSHOT_S = 1800
"""A learner that has published nothing for this long (wall clock) is stuck."""


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: Literal["warning", "critical"]
    summary: str
    description: str


ALERTS: tuple[Alert, ...] = (
    Alert("AdloopTargetDown", 'up{job=~"adloop-.*"} == 0', "1m", "critical",
          "{{ $labels.job }} target {{ $labels.instance }} is down",
          "Prometheus cannot scrape the process: it crashed, hangs, or its port moved."),
    Alert("AdloopProcessRestarted",
          'changes(process_start_time_seconds{job=~"adloop-.*"}[15m]) > 0', "0m", "warning",
          "{{ $labels.job }} on {{ $labels.instance }} restarted",
          "The process started again within the last 15 minutes: it crashed or was killed "
          "and its supervisor restarted it. Read the end of its previous log; repeated "
          "restarts are a crash loop."),
    Alert("AdloopSnapshotRefused",
          'sum by (job, instance) (increase(adloop_server_swaps_total{result!~"ok|rollback"}[15m]))'
          " > 0",
          "0m", "warning", "{{ $labels.instance }} refused a model snapshot",
          "A snapshot failed checksum, load, warm-up or parity; the previous version keeps "
          "serving. Check the server log for the reason and the learner's export."),
    Alert("AdloopModelUpdateRefused",
          "sum by (job, reason) (increase(adloop_server_model_updates_refused_total[15m])) > 0",
          "0m", "critical",
          "a model-updates record was refused before any fetch ({{ $labels.reason }})",
          "A model-updates record was unsigned, badly signed, signed with a key id the "
          "servers lack, or named a snapshot outside the snapshot bases; nothing was "
          "fetched and the record is in the dlq topic. Outside a key rotation, something "
          "other than the learner writes the topic: check its Kafka ACLs (docs/security.md)."),
    Alert("AdloopLearnerSnapshotRefused",
          "sum by (job, reason) (increase(adloop_learner_snapshots_refused_total[15m])) > 0",
          "0m", "warning", "the learner refused to publish a snapshot ({{ $labels.reason }})",
          "The learner's own validation rejected a candidate snapshot; serving keeps the "
          "last published one."),
    Alert("AdloopOnlineWorseThanControl",
          'sum by (job) (increase(adloop_learner_abtest_decisions_total{decision="online_worse"}'
          "[30m])) > 0",
          "0m", "critical", "the online model earns less than the control model",
          "The learner's sequential test found the online bucket's revenue per request "
          "below the control bucket's with confidence (docs/abtest.md). The learner stops "
          "promoting and re-announces the best earlier version that was not worse; its log "
          "line abtest.decision has the evidence, abtest.rollback what was restored."),
    Alert("AdloopPromotionHeld", "max by (job) (adloop_learner_abtest_promotion_held) == 1",
          "1h", "warning", "the learner has promoted no new version for an hour after a "
          "rollback",
          "After an online_worse decision the restored version has not yet served "
          "--abtest-resume-requests per bucket without being found worse, or nothing could "
          "be rolled back to (adloop_learner_abtest_rollbacks_total{result!=\"published\"}). "
          "Servers keep the restored version; check the abtest.* log lines."),
    Alert("AdloopNoRecentSnapshot",
          f"(time() - max by (job, instance) (adloop_learner_last_publish_timestamp_seconds)"
          f" > {NO_SNAPSHOT_S})\nand on (job, instance)\n"
          f"(time() - process_start_time_seconds > {NO_SNAPSHOT_S})",
          "5m", "warning", "no snapshot published for over 30 minutes",
          "The learner is up but has not published a snapshot: no feedback arrives, "
          "updates fail, or every candidate is refused."),
    Alert("AdloopFreshnessOverTarget", f"{FRESHNESS_P95} > {FRESHNESS_TARGET_S}", "15m",
          "warning", "model freshness p95 is over its 10-minute target",
          "Snapshots reach serving more than 10 event-time minutes after the newest event "
          "they were trained on: the learner or the joiner is falling behind."),
    Alert("AdloopDeadLetterRate",
          "sum by (job, topic) (rate(adloop_dead_letters_total[5m]))\n/\n"
          "sum by (job, topic) (rate(adloop_consumed_records_total[5m]))\n> 0.01",
          "5m", "warning", "over 1% of {{ $labels.topic }} records go to the dead-letter topic",
          "A producer writes malformed events. Read the `dlq` topic (adloop consume dlq) "
          "for the reasons."),
    Alert("AdloopConsumerLagGrowing",
          "sum by (job, group, topic) (adloop_consumer_lag_records) > 1000\nand\n"
          "sum by (job, group, topic) (deriv(adloop_consumer_lag_records[10m])) > 0",
          "10m", "warning", "consumer group {{ $labels.group }} falls behind on "
          "{{ $labels.topic }}",
          "The consumer lag is over 1000 records and still growing."),
    Alert("AdloopServerSheddingLoad",
          "min by (job, instance) (adloop_server_beam_scale_ratio) < 1", "5m", "warning",
          "{{ $labels.instance }} narrows beams to shed load",
          "The server runs with reduced beam widths (lower recommendation quality) because "
          "its queue is deep. Add replicas or reduce traffic."),
    Alert("AdloopServerRejectingRequests",
          "sum by (job, instance) (rate(adloop_server_shed_total[5m])) > 0",
          "2m", "critical", "{{ $labels.instance }} refuses requests with 429",
          "Beams are already at their minimum and the queue is full."),
    Alert("AdloopServerErrorRate", f"{ERROR_RATIO} > 0.01", "5m", "critical",
          "over 1% of {{ $labels.job }} requests fail with 5xx",
          "The serving worker answers with server errors; check its log."),
    Alert("AdloopServerLatencyHigh", f"{P99_LATENCY} > 0.25", "10m", "warning",
          "{{ $labels.job }} p99 latency is over 250 ms", "Requests are slow: look at batch "
          "size, queue depth and beam width on the serving dashboard."),
    Alert("AdloopImpressionsDropped",
          "sum by (job, instance) (rate(adloop_server_impressions_dropped_total[5m])) > 0",
          "1m", "critical", "{{ $labels.instance }} drops impressions",
          "The impression buffer is full (Kafka unreachable?): feedback for these requests "
          "is lost."),
    Alert("AdloopProduceErrors",
          "sum by (job, topic) (rate(adloop_produce_errors_total[5m])) > 0", "5m", "warning",
          "{{ $labels.job }} fails to produce to {{ $labels.topic }}",
          "The broker does not acknowledge records after the producer's retries."),
)

# --------------------------------------------------------------------------------------
# Panels.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    may_be_empty: bool = False
    """True when a healthy stack can have no series for it (error counters, rare events)."""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: Literal["timeseries", "stat"] = "timeseries"
    description: str = ""
    width: int = 8
    height: int = 8


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = field(default=("adloop",))

    @property
    def panels(self) -> list[Panel]:
        return [p for r in self.rows for p in r.panels]


def q(expr: str, legend: str = "", may_be_empty: bool = False) -> Query:
    return Query(expr, legend, may_be_empty)


def ts(title: str, *queries: Query, unit: str = "short", description: str = "",
       width: int = 8) -> Panel:
    return Panel(title, queries, unit, "timeseries", description, width, 8)


def st(title: str, query: Query, unit: str = "short", description: str = "",
       width: int = 4) -> Panel:
    return Panel(title, (query,), unit, "stat", description, width, 4)


def _rate(metric: str, by: str = "", window: str = "1m") -> str:
    agg = f"sum by ({by}) " if by else "sum "
    return f"{agg}(rate({metric}[{window}]))"


PROCESSES_ROW = Row("Processes", (
    ts("Targets up", q('up{job=~"adloop-.*"}', "{{job}} {{instance}}"), width=8,
       description="1 when Prometheus scraped the process at its last attempt."),
    ts("CPU", q('rate(process_cpu_seconds_total{job=~"adloop-.*"}[1m])',
                "{{job}} {{instance}}"), unit="percentunit", width=8),
    ts("Resident memory", q('process_resident_memory_bytes{job=~"adloop-.*"}',
                            "{{job}} {{instance}}"), unit="bytes", width=8),
))

OVERVIEW = Dashboard(
    "adloop-overview", "adloop / Overview",
    "The whole loop on one page: traffic, latency, beams, Kafka, freshness, revenue, "
    "learning and model versions.",
    (
        Row("Headline", (
            st("Requests / s", q(f"sum({REQUEST_RATE})"), "reqps"),
            st("p99 latency", q(f"max({P99_LATENCY})"), "s"),
            st("Freshness p95", q(f"max({FRESHNESS_P95})"), "s",
               "Event time from the newest trained event to the snapshot being published."),
            st("Revenue per mille", q(f"sum({RPM})"), "short",
               "Revenue per 1000 impressions over the last 5 minutes."),
            st("Consumer lag", q(f"sum({LAG})"), "short", "Records behind, all groups."),
            st("Model version", q("max by (version) (adloop_server_model_version_info == 1)",
                                  "{{version}}"), "none"),
        )),
        Row("Loop", (
            ts("Traffic", q(f"sum by (code) ({REQUEST_RATE})", "HTTP {{code}}"),
               q(_rate("adloop_traffic_clicks_total"), "clicks"),
               q(_rate("adloop_traffic_conversions_total"), "conversions"), unit="reqps"),
            ts("Serving latency", q(f"max({P50_LATENCY})", "p50"),
               q(f"max({P99_LATENCY})", "p99"), unit="s"),
            ts("Beam width", q("max by (level) (adloop_server_beam_width)", "level {{level}}"),
               q("min(adloop_server_beam_scale_ratio)", "scale"),
               description="Beam width per semantic-id level; scale < 1 means load shedding."),
            ts("Kafka throughput", q(f"sum by (topic) ({PRODUCED_RATE})", "produced {{topic}}"),
               q(f"sum by (topic) ({CONSUMED_RATE})", "consumed {{topic}}"), unit="rps"),
            ts("Consumer lag by group", q(f"sum by (group, topic) ({LAG})",
                                          "{{group}} {{topic}}")),
            ts("Dead letters", q(f"sum by (topic, reason) ({DEAD_LETTER_RATE})",
                                 "{{topic}} {{reason}}", may_be_empty=True), unit="rps"),
            ts("Freshness", q(f"max({FRESHNESS_P95})", "p95 freshness"),
               q("time() - max(adloop_learner_last_publish_timestamp_seconds)",
                 "since last publish"), unit="s"),
            ts("Revenue", q(f"sum({RPM})", "revenue per mille"),
               q(_rate("adloop_traffic_revenue_total", window="5m"), "revenue / s")),
            ts("Reward and loss", q("max(adloop_learner_mean_reward)", "mean reward"),
               q("max by (term) (adloop_learner_loss)", "loss {{term}}"),
               q("max(adloop_learner_kl_reference)", "KL to reference")),
            ts("Model swaps", q("sum by (result) (increase(adloop_server_swaps_total[5m]))",
                                "{{result}}", may_be_empty=True),
               q("sum(increase(adloop_learner_snapshots_published_total[5m]))", "published"),
               width=12),
            ts("Served model version", q("max by (instance, version) "
                                         "(adloop_server_model_version_info == 1)",
                                         "{{instance}} {{version}}"), width=12),
        )),
        PROCESSES_ROW,
    ),
)

SERVING = Dashboard(
    "adloop-serving", "adloop / Serving",
    "The serving worker: requests, latency, batching, beam widths and load shedding, "
    "impression logging, snapshot swaps.",
    (
        Row("Requests", (
            ts("Requests by code", q(f"sum by (code) ({REQUEST_RATE})", "{{code}}"),
               unit="reqps"),
            ts("Latency", q(f"max({P50_LATENCY})", "p50"),
               q(_quantile(0.9, "adloop_server_request_duration_seconds", "1m", "job"), "p90 "
                 "{{job}}"),
               q(f"max({P99_LATENCY})", "p99"), unit="s"),
            ts("Errors and rejections", q(f"max({ERROR_RATIO})", "5xx ratio", may_be_empty=True),
               q(_rate("adloop_server_shed_total", "instance"),
                 "429 / s {{instance}}"), unit="short"),
        )),
        Row("Batching and beams", (
            ts("Batch size", q(_quantile(0.5, "adloop_server_batch_size", "1m"), "p50"),
               q(_quantile(0.99, "adloop_server_batch_size", "1m"), "p99"),
               q("sum(rate(adloop_server_batch_size_sum[1m])) / "
                 "sum(rate(adloop_server_batch_size_count[1m]))", "mean")),
            ts("Queue depth and wait",
               q("max by (instance) (adloop_server_queue_depth)", "depth {{instance}}"),
               q(_quantile(0.99, "adloop_server_queue_wait_seconds", "1m"), "p99 wait s")),
            ts("Batch model time", q(_quantile(0.5, "adloop_server_batch_duration_seconds", "1m"),
                                     "p50"),
               q(_quantile(0.99, "adloop_server_batch_duration_seconds", "1m"), "p99"), unit="s"),
            ts("Beam width per level", q("max by (instance, level) (adloop_server_beam_width)",
                                         "{{instance}} level {{level}}"),
               q("min by (instance) (adloop_server_beam_scale_ratio)", "{{instance}} scale"),
               q("max by (instance) (adloop_server_organic_beam_width)",
                 "{{instance}} organic", may_be_empty=True),
               description="The load-shedding controller narrows beams (scale < 1) before "
                           "it refuses requests; the organic search of mixed feeds narrows "
                           "with them (empty without mixed feeds)."),
        )),
        Row("Impressions and snapshots", (
            ts("Impression logging", q(_rate("adloop_server_impressions_produced_total"),
                                       "produced"),
               q(_rate("adloop_server_impressions_dropped_total", "reason"), "dropped {{reason}}",
                 may_be_empty=True),
               q("sum(adloop_server_impression_buffer_records)", "buffered"), unit="short"),
            ts("Ads", q("max(adloop_server_servable_ads)", "servable (in the trie)"),
               q("max(adloop_server_catalog_ads)", "in the catalog")),
            ts("Swaps", q("sum by (result) (increase(adloop_server_swaps_total[15m]))",
                          "{{result}}", may_be_empty=True)),
            ts("Snapshot load time", q(_quantile(0.99, "adloop_server_snapshot_load_seconds",
                                                 "15m"), "p99 {{job}}"), unit="s"),
            st("Model version", q("max by (version) (adloop_server_model_version_info == 1)",
                                  "{{version}}"), "none", width=6),
            st("Execution provider", q("max by (provider) (adloop_server_provider_info)",
                                       "{{provider}}"), "none", width=6),
            st("Model age", q("time() - max(adloop_server_model_swap_timestamp_seconds)"), "s",
               "Wall-clock seconds since the last successful swap.", width=6),
            st("Served data behind learner",
               q("max(adloop_learner_data_watermark_timestamp_seconds) - "
                 "min(adloop_server_snapshot_data_watermark_timestamp_seconds)"), "s",
               "Event-time seconds between the learner's newest trained event and the served "
               "snapshot's.", width=6),
        )),
        PROCESSES_ROW,
    ),
)

STREAMS = Dashboard(
    "adloop-streams", "adloop / Streams",
    "Kafka throughput, consumer lag and dead letters; the joiner; the traffic generator.",
    (
        Row("Kafka", (
            ts("Produced", q(f"sum by (topic) ({PRODUCED_RATE})", "{{topic}}"), unit="rps"),
            ts("Consumed", q(f"sum by (topic) ({CONSUMED_RATE})", "{{topic}}"), unit="rps"),
            ts("Produce errors", q(_rate("adloop_produce_errors_total", "job, topic", "5m"),
                                   "{{job}} {{topic}}", may_be_empty=True), unit="rps"),
            ts("Dead letters", q(f"sum by (topic, reason) ({DEAD_LETTER_RATE})",
                                 "{{topic}} {{reason}}", may_be_empty=True), unit="rps"),
            ts("Consumer lag by group", q(f"sum by (group, topic) ({LAG})",
                                          "{{group}} {{topic}}")),
            ts("Consumer lag by partition",
               q("max by (group, topic, partition) (adloop_consumer_lag_records)",
                 "{{group}} {{topic}}/{{partition}}")),
        )),
        Row("Joiner", (
            ts("Feedback emitted", q(_rate("adloop_join_feedback_total", "kind"),
                                     "{{kind}}"),
               q(_rate("adloop_join_corrections_total"), "corrections"), unit="rps"),
            ts("Late and orphan events",
               q(_rate("adloop_join_late_total", "topic"), "late {{topic}}",
                 may_be_empty=True),
               q(_rate("adloop_join_orphan_total", "topic"), "orphan {{topic}}",
                 may_be_empty=True), unit="rps"),
            ts("Input records by outcome",
               q(_rate("adloop_join_events_total", "topic, outcome"), "{{topic}} {{outcome}}"),
               unit="rps"),
            ts("Join table", q("sum(adloop_join_table_requests)", "requests held")),
            ts("Joiner lag", q("sum by (topic) (adloop_join_lag_records)", "{{topic}}"),
               description="Unread records per input topic (the joiner's consumer lag)."),
            ts("Joiner watermark behind traffic (event time)",
               q("max(adloop_traffic_sim_time_seconds) - min(adloop_join_watermark_seconds)",
                 "event s"), unit="s",
               description="How far the slowest partition's watermark trails the simulator's "
                           "clock."),
            ts("Impression to feedback (event time)",
               q(_quantile(0.5, "adloop_join_elapsed_seconds", "5m", "kind"),
                 "p50 {{kind}}"),
               q(_quantile(0.95, "adloop_join_elapsed_seconds", "5m", "kind"),
                 "p95 {{kind}}"), unit="s", width=16),
        )),
        Row("Traffic", (
            ts("Requests by outcome", q(_rate("adloop_traffic_requests_total", "outcome"),
                                        "{{outcome}}"), unit="reqps"),
            ts("Client latency p99", q(f"max({TRAFFIC_P99})", "p99"), unit="s"),
            ts("Impressions, clicks, conversions",
               q(_rate("adloop_traffic_impressions_total"), "impressions"),
               q(_rate("adloop_traffic_clicks_total"), "clicks"),
               q(_rate("adloop_traffic_conversions_total"), "conversions"), unit="rps"),
            ts("In flight", q("sum(adloop_traffic_requests_in_flight)", "requests in flight")),
            ts("Click-through rate", q("sum(rate(adloop_traffic_clicks_total[5m])) / "
                                       "sum(rate(adloop_traffic_impressions_total[5m]))",
                                       "CTR"), unit="percentunit"),
            ts("Pending delayed events", q("sum(adloop_traffic_pending_events)", "pending")),
            ts("Simulated time speed", q("max(deriv(adloop_traffic_sim_time_seconds[1m]))",
                                         "event s / wall s")),
        )),
        PROCESSES_ROW,
    ),
)

LEARNER = Dashboard(
    "adloop-learner", "adloop / Learner",
    "The continuous RSPO learner: updates, losses, reward, freshness and snapshot publishing.",
    (
        Row("Training", (
            ts("Updates and lists", q(_rate("adloop_learner_updates_total"), "updates / s"),
               q(_rate("adloop_learner_lists_total", "outcome"), "lists / s {{outcome}}"),
               q(_rate("adloop_learner_replayed_lists_total"), "replayed lists / s")),
            ts("Loss by term", q("max by (term) (adloop_learner_loss)", "{{term}}")),
            ts("Reward and KL", q("max(adloop_learner_mean_reward)", "mean reward"),
               q("max(adloop_learner_kl_reference)", "KL to reference")),
            ts("Update time", q(_quantile(0.5, "adloop_learner_update_seconds", "5m"), "p50"),
               q(_quantile(0.99, "adloop_learner_update_seconds", "5m"), "p99"), unit="s"),
            ts("Holdout value-NDCG", q("max by (model) (adloop_learner_holdout_ndcg)",
                                       "{{model}}")),
            ts("Versions and new ads", q("max(adloop_learner_model_version)",
                                         "last published version"),
               q("sum(increase(adloop_learner_new_ads_total[15m]))", "new ads (15m)")),
        )),
        Row("Freshness", (
            ts("Freshness", q(_quantile(0.5, "adloop_learner_freshness_seconds", "15m"),
                              "p50 {{job}}"),
               q(f"max({FRESHNESS_P95})", "p95"), unit="s",
               description="Event time from the newest trained event to the snapshot being "
                           "published."),
            ts("Since last publish",
               q("time() - max(adloop_learner_last_publish_timestamp_seconds)", "wall s"),
               unit="s"),
            ts("Learner behind traffic (event time)",
               q("max(adloop_traffic_sim_time_seconds) - "
                 "max(adloop_learner_data_watermark_timestamp_seconds)", "event s"), unit="s"),
        )),
        Row("Snapshots", (
            ts("Published and refused",
               q("sum(increase(adloop_learner_snapshots_published_total[15m]))", "published"),
               q("sum by (reason) (increase(adloop_learner_snapshots_refused_total[15m]))",
                 "refused {{reason}}", may_be_empty=True)),
            ts("Export and validation time",
               q(_quantile(0.95, "adloop_learner_export_seconds", "15m"), "export p95"),
               q(_quantile(0.95, "adloop_learner_validation_seconds", "15m"),
                 "validation p95"), unit="s"),
            ts("Server swaps", q("sum by (result) (increase(adloop_server_swaps_total[15m]))",
                                 "{{result}}", may_be_empty=True)),
            ts("Stale serving version",
               q("max(adloop_learner_candidates_refused_in_a_row)", "refused in a row"),
               q("time() - max(adloop_learner_serving_since_timestamp_seconds)",
                 "serving for (s)"),
               description="Candidates the promotion guard refused since the serving version "
                           "was announced, and how long that version has been serving."),
        )),
        Row("Live A/B test (online vs control)", (
            ts("RPM by bucket",
               q("1000 * sum by (bucket) (rate(adloop_learner_abtest_revenue_total[15m]))\n/\n"
                 "sum by (bucket) (rate(adloop_learner_abtest_requests_total[15m]))",
                 "{{bucket}} (15m)", may_be_empty=True),
               q("max by (bucket) (adloop_learner_abtest_rpm)", "{{bucket}} (test epoch)",
                 may_be_empty=True),
               description="Realized revenue per 1000 requests of the final feedback, per "
                           "bucket: over the last 15 minutes, and over the current test "
                           "epoch (what the sequential test compares)."),
            ts("Online − control RPM, always-valid interval",
               q("max by (stat) (adloop_learner_abtest_rpm_difference)", "{{stat}}",
                 may_be_empty=True),
               description="The sequential test's estimate and its always-valid interval "
                           "(docs/abtest.md): an interval wholly below 0 is an online_worse "
                           "decision."),
            ts("CTR and CVR by bucket",
               q("sum by (bucket) (rate(adloop_learner_abtest_clicks_total[15m]))\n/\n"
                 "sum by (bucket) (rate(adloop_learner_abtest_items_total[15m]))",
                 "CTR {{bucket}}", may_be_empty=True),
               q("sum by (bucket) (rate(adloop_learner_abtest_conversions_total[15m]))\n/\n"
                 "sum by (bucket) (rate(adloop_learner_abtest_clicks_total[15m]))",
                 "CVR {{bucket}}", may_be_empty=True), unit="percentunit"),
            ts("Test epoch requests",
               q("max by (bucket) (adloop_learner_abtest_epoch_requests)", "{{bucket}}",
                 may_be_empty=True)),
            ts("Decisions and rollbacks",
               q("sum by (decision) (increase(adloop_learner_abtest_decisions_total[1h]))",
                 "{{decision}} (1h)", may_be_empty=True),
               q("sum by (result) (increase(adloop_learner_abtest_rollbacks_total[1h]))",
                 "rollback {{result}} (1h)", may_be_empty=True),
               q("max(adloop_learner_abtest_promotion_held)", "promotion held",
                 may_be_empty=True)),
        )),
        PROCESSES_ROW,
    ),
)

def _per_industry(metric: str) -> str:
    return f"sum by (industry) (rate({metric}[5m]))"


AD_STATS = Dashboard(
    "adloop-ad-stats", "adloop / Ad statistics",
    "Top ads, advertisers and industries from final feedback lists (`adloop stats`, "
    "faust-streaming, at-least-once: a restart after a crash can briefly count a few lists "
    "twice). Per-window figures per ad are in the `ad-stats` topic.",
    (
        Row("Top ads and advertisers (newest complete tumbling window)", (
            ts("Top ads by revenue",
               q('max by (rank, id) (adloop_stats_top_revenue{dimension="ad"})',
                 "#{{rank}} {{id}}"), width=12,
               description="Revenue (sum of rewards) of the top-N ads in the newest complete "
                           "tumbling window of impression time."),
            ts("Top advertisers by revenue",
               q('max by (rank, id) (adloop_stats_top_revenue{dimension="advertiser"})',
                 "#{{rank}} {{id}}"), width=12),
        )),
        Row("Industries", (
            ts("Revenue by industry", q(_per_industry("adloop_stats_industry_revenue_total"),
                                        "{{industry}}"), unit="short",
               description="Revenue per second of wall time, by the industry of the shown ad."),
            ts("Impressions by industry",
               q(_per_industry("adloop_stats_industry_impressions_total"), "{{industry}}"),
               unit="rps"),
            ts("CTR by industry",
               q(f"{_per_industry('adloop_stats_industry_clicks_total')} / "
                 f"{_per_industry('adloop_stats_industry_impressions_total')}",
                 "{{industry}}"), unit="percentunit"),
            ts("eCPM by industry",
               q(f"1000 * {_per_industry('adloop_stats_industry_revenue_total')} / "
                 f"{_per_industry('adloop_stats_industry_impressions_total')}",
                 "{{industry}}")),
            ts("Conversions by industry",
               q(_per_industry("adloop_stats_industry_conversions_total"), "{{industry}}",
                 may_be_empty=True), unit="rps"),
        )),
        Row("Stats stage", (
            ts("Records by outcome", q(_rate("adloop_stats_events_total", "topic, outcome"),
                                       "{{topic}} {{outcome}}"), unit="rps"),
            ts("ad-stats records written", q(_rate("adloop_stats_ad_stats_sent_total"),
                                             "acknowledged"), unit="rps"),
            ts("Top-N window end (event time)", q("max(adloop_stats_window_end_seconds)",
                                                  "window end"), unit="dateTimeAsIso"),
        )),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (OVERVIEW, SERVING, STREAMS, LEARNER, AD_STATS)

# --------------------------------------------------------------------------------------
# Building.
# --------------------------------------------------------------------------------------


def _panel_builder(p: Panel, panel_id: int, pos: dm.GridPos) -> gts.Panel | gstat.Panel:
    builder: gts.Panel | gstat.Panel
    if p.kind == "stat":
        builder = (gstat.Panel()
                   .reduce_options(gcommon.ReduceDataOptions().calcs(["lastNotNull"]))
                   .graph_mode(cm.BigValueGraphMode.AREA)
                   .color_mode(cm.BigValueColorMode.VALUE))
        if p.unit == "none":
            builder = builder.text_mode(cm.BigValueTextMode.NAME)
    else:
        builder = (gts.Panel()
                   .line_width(1).fill_opacity(10)
                   .legend(gcommon.VizLegendOptions()
                           .display_mode(cm.LegendDisplayMode.LIST)
                           .placement(cm.LegendPlacement.BOTTOM).show_legend(True)))
    builder = (builder.id(panel_id).title(p.title).datasource(DATASOURCE).unit(p.unit)
               .grid_pos(pos))
    if p.description:
        builder = builder.description(p.description)
    for i, query in enumerate(p.queries):
        target = (gprom.Dataquery().ref_id(chr(ord("A") + i)).expr(query.expr)
                  .datasource(DATASOURCE))
        if query.legend:
            target = target.legend_format(query.legend)
        if p.kind == "stat":
            target = target.instant()
        builder = builder.with_target(target)
    return builder


def build_dashboard(d: Dashboard) -> dict[str, Any]:
    """The Grafana JSON model of one dashboard (a plain dict, keys sorted on output)."""
    builder = (gdash.Dashboard(d.title).uid(d.uid).description(d.description)
               .tags(list(d.tags)).editable().refresh("10s").time("now-30m", "now")
               .timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR)
               .link(gdash.DashboardLink("adloop dashboards").type(dm.DashboardLinkType.DASHBOARDS)
                     .tags(["adloop"]).as_dropdown(True).include_vars(True).keep_time(True)))
    panel_id, y = 1, 0
    for row in d.rows:   # lay out explicitly: rows full width, panels flow left to right
        builder = builder.with_row(gdash.Row(row.title).id(panel_id)
                                   .grid_pos(dm.GridPos(h=1, w=24, x=0, y=y)))
        panel_id, y = panel_id + 1, y + 1
        x, line_h = 0, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y, line_h = 0, y + line_h, 0
            pos = dm.GridPos(h=p.height, w=p.width, x=x, y=y)
            builder = builder.with_panel(_panel_builder(p, panel_id, pos))
            panel_id, x, line_h = panel_id + 1, x + p.width, max(line_h, p.height)
        y += line_h
    model: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return model


def dashboard_json(d: Dashboard) -> str:
    return json.dumps(build_dashboard(d), indent=2, sort_keys=True) + "\n"


def _rules_yaml(groups: list[dict[str, Any]], header: str) -> str:
    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _Dumper.add_representer(str, _str)
    body = yaml.dump({"groups": groups}, Dumper=_Dumper, sort_keys=False, width=100)
    return header + body


_GENERATED = ("# Generated by `python -m deploy.observability.dashboards` from\n"
              "# deploy/observability/dashboards.py; edit that file, not this one.\n")


def recording_rules_yaml() -> str:
    rules = [{"record": r.record, "expr": r.expr} for r in RECORDING_RULES]
    return _rules_yaml([{"name": "adloop-recording", "rules": rules}],
                       _GENERATED)


def alert_rules_yaml() -> str:
    rules = []
    for a in ALERTS:
        rule: dict[str, Any] = {"alert": a.name, "expr": a.expr}
        if a.for_ != "0m":
            rule["for"] = a.for_
        rule["labels"] = {"severity": a.severity}
        rule["annotations"] = {"summary": a.summary, "description": a.description}
        rules.append(rule)
    return _rules_yaml([{"name": "adloop-alerts", "rules": rules}], _GENERATED)


def _recording_rules_markdown() -> str:
    lines = ["", "## Recording rules (`deploy/prometheus/rules/adloop-recording.yml`)", "",
             "The headline figures, precomputed; dashboards and alerts read these names.", "",
             "| series | expression |", "|---|---|"]
    for r in RECORDING_RULES:
        expr = " ".join(r.expr.split()).replace("|", "\\|")
        lines.append(f"| `{r.record}` | `{expr}` |")
    return "\n".join(lines) + "\n"


def generated_files() -> dict[Path, str]:
    """Every file this module owns, with the content the code generates now."""
    files = {DASHBOARD_DIR / f"{d.uid}.json": dashboard_json(d) for d in DASHBOARDS}
    files[RULES_DIR / "adloop-recording.yml"] = recording_rules_yaml()
    files[RULES_DIR / "adloop-alerts.yml"] = alert_rules_yaml()
    files[METRICS_DOC] = render_markdown() + _recording_rules_markdown()
    return files


# --------------------------------------------------------------------------------------
# What the live test evaluates.
# --------------------------------------------------------------------------------------

_METRIC_RE = re.compile(r"\b(adloop_[a-z0-9_]+|adloop:[a-z0-9_:]+|process_[a-z_]+|up)\b")
_SERIES_SUFFIX = re.compile(r"_(bucket|sum|count)$")


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str
    may_be_empty: bool

    @property
    def id(self) -> str:
        return f"{self.dashboard}/{self.panel}/{self.ref}"


def panel_queries() -> list[PanelQuery]:
    """Every PromQL expression of every dashboard panel."""
    out = []
    for d in DASHBOARDS:
        for p in d.panels:
            for i, query in enumerate(p.queries):
                out.append(PanelQuery(d.uid, p.title, chr(ord("A") + i), query.expr,
                                      query.may_be_empty))
    return out


def recording_rules() -> tuple[RecordingRule, ...]:
    return RECORDING_RULES


def metrics_in(expr: str) -> set[str]:
    """The inventory metrics an expression reads, recording rules expanded."""
    rules = {r.record: r.expr for r in RECORDING_RULES}
    found: set[str] = set()
    for name in _METRIC_RE.findall(expr):
        if name in rules:
            found |= metrics_in(rules[name])
        elif name.startswith("adloop_"):
            base = _SERIES_SUFFIX.sub("", name)
            found.add(base if base in BY_NAME else name)
        else:
            found.add(name)
    return found


def processes_needed(expr: str) -> set[str]:
    """The processes whose metrics an expression reads ("all" for shared metrics)."""
    return {BY_NAME[m].process if m in BY_NAME else "all" for m in metrics_in(expr)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a committed file differs from the generated one")
    args = parser.parse_args(argv)
    stale = []
    for path, content in generated_files().items():
        rel = path.relative_to(ROOT)
        current = path.read_text() if path.exists() else None
        if current == content:
            continue
        if args.check:
            stale.append(str(rel))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {rel}")
    if stale:
        print("out of date (run python -m deploy.observability.dashboards):\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
