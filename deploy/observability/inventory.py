"""Every metric an adloop process exposes, in one table.

This is the source of ``docs/metrics.md`` and the list the naming lint
(``tests/observability/test_metric_names.py``) checks the code against: a metric
defined in ``streams/``, ``learner/`` or ``server/`` must be listed here, and
every metric a dashboard panel or a Prometheus rule reads must be listed here.

Naming (Prometheus conventions, enforced by ``streams.metrics``): the ``adloop_``
prefix, then the process (``server_``, ``join_``, ``learner_``, ``traffic_``;
none for the Kafka helpers every process shares), base units in the name
(``_seconds``, ``_bytes``, ``_timestamp_seconds`` for Unix times, ``_records``
for record counts), ``_total`` for counters, histograms (never summaries) for
latencies and freshness so they aggregate across replicas, and label values from
a small fixed set — never a user, request, ad or event id.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[2]

Kind = Literal["counter", "gauge", "histogram"]
Process = Literal["all", "server", "join", "stats", "learn", "replay", "pretrain"]

FORBIDDEN_LABELS = frozenset({
    "user", "user_id", "request", "request_id", "ad", "ad_id", "event_id", "session_id",
    "impression_id", "click_id", "conversion_id", "advertiser_id", "semantic_id", "offset",
    "key", "uri", "path", "url", "sha256", "error", "detail", "message",
})
"""Labels whose values are unbounded (ids, free text): never allowed on an adloop metric."""

HISTOGRAM_UNITS = ("_seconds", "_bytes", "_size", "_ratio", "_width")
"""Suffixes a histogram name may end in (the same list ``streams.metrics.histogram`` accepts)."""


@dataclass(frozen=True)
class Metric:
    """One row of the inventory."""

    name: str
    kind: Kind
    process: Process
    labels: tuple[str, ...]
    meaning: str
    label_values: str = ""
    """The bounded set each label takes, in words."""
    planned: bool = False
    """True while the component that exposes it is not in the tree yet."""


def _m(name: str, kind: Kind, process: Process, labels: tuple[str, ...], meaning: str,
       label_values: str = "", planned: bool = False) -> Metric:
    return Metric(name, kind, process, labels, meaning, label_values, planned)


_BUCKETS = "bucket: online, control, none (served without a control bucket)"

METRICS: tuple[Metric, ...] = (
    # --- every process (streams.metrics, streams.kafka_io) -------------------------------
    _m("adloop_build_info", "gauge", "all", ("version", "process"),
       "Always 1; the labels carry the package version and the subcommand.",
       "version: the package version; process: join, learn, serve, replay, ..."),
    _m("adloop_produced_records_total", "counter", "all", ("topic",),
       "Records the broker acknowledged, by logical topic.",
       "topic: the 10 logical topics (ads, impressions, clicks, conversions, feedback, "
       "organic-items, organic-engagements, model-updates, ad-stats, dlq)"),
    _m("adloop_produce_errors_total", "counter", "all", ("topic",),
       "Records the broker did not acknowledge (after the producer's retries).",
       "topic: logical topic"),
    _m("adloop_consumed_records_total", "counter", "all", ("topic",),
       "Records consumed and decoded, good or dead-lettered.", "topic: logical topic"),
    _m("adloop_dead_letters_total", "counter", "all", ("topic", "reason"),
       "Records sent to the `dlq` topic, by source topic and rejection reason.",
       "topic: logical source topic; reason: the DlqReason enum (not_json, invalid, "
       "schema_version, oversized, late, orphan, handler_error, unsigned, bad_signature, "
       "unknown_key, uri_outside_bases)"),
    _m("adloop_consumer_lag_records", "gauge", "all", ("group", "topic", "partition"),
       "High watermark minus the consumer's position.",
       "group: consumer group; topic: logical topic; partition: 0..partitions-1"),
    # --- server: adloop serve (server/metrics.py) ---------------------------------------
    _m("adloop_server_requests_total", "counter", "server", ("code",),
       "HTTP requests to /v1/recommend, by status code.", "code: HTTP status (200, 422, 429, ...)"),
    _m("adloop_server_request_duration_seconds", "histogram", "server", (),
       "Request arrival to response, /v1/recommend."),
    _m("adloop_server_queue_wait_seconds", "histogram", "server", (),
       "Time a request waited for its batch to start."),
    _m("adloop_server_batch_size", "histogram", "server", (), "Requests per model call."),
    _m("adloop_server_batch_duration_seconds", "histogram", "server", (),
       "Model time per batch (encoder, beam search, value heads)."),
    _m("adloop_server_queue_depth", "gauge", "server", (), "Requests waiting for a batch."),
    _m("adloop_server_beam_width", "gauge", "server", ("level",),
       "Beam width in use per semantic-id level (after load shedding).",
       "level: 0..levels-1 of the semantic id"),
    _m("adloop_server_beam_scale_ratio", "gauge", "server", (),
       "The load controller's beam scale in (0, 1]; below 1 the server sheds load by "
       "narrowing beams."),
    _m("adloop_server_organic_beam_width", "gauge", "server", (),
       "Base beam width per level of the organic search of mixed feeds in use: "
       "organic_beam scaled by the load controller like the ads' beams (a request never "
       "searches narrower than its organic_k)."),
    _m("adloop_server_request_beam_width", "histogram", "server", ("level",),
       "Beam width used per request and level.", "level: semantic-id level"),
    _m("adloop_server_context_unmatched_total", "counter", "server", (),
       "Requests whose context has no key the model reads (its manifest's "
       "context_features): ranked as if no context were given. The first one per model "
       "version is logged (serve.context_unmatched)."),
    _m("adloop_server_shed_total", "counter", "server", (),
       "Requests refused with 429 (the narrowest beams could not hold the latency target)."),
    _m("adloop_server_batches_during_swap_total", "counter", "server", (),
       "Batches that overlapped a snapshot swap (load, warm-up, parity of a new version on "
       "the follower thread): the load controller neither narrows beams nor updates its "
       "service time from them, and sheds nothing while a swap runs."),
    _m("adloop_server_ranking_mode_total", "counter", "server", ("mode",),
       "Requests by how their ads' candidates were found: catalogue (every servable ad "
       "scored by the value heads, the catalogue being within "
       "ADLOOP_SERVER_SCORE_CATALOGUE_MAX) or beams (constrained beam search, then the "
       "value heads on the final beams).", "mode: catalogue, beams"),
    _m("adloop_server_explored_total", "counter", "server", (),
       "Requests whose last slot went to an exploration draw (a servable ad this server "
       "has shown fewer than ADLOOP_SERVER_EXPLORE_MAX_SHOWN times); the exploration "
       "rate actually served is its rate over adloop_server_requests_total{code=\"200\"}."),
    _m("adloop_server_explore_ratio", "gauge", "server", (),
       "Configured exploration probability per request (ADLOOP_SERVER_EXPLORE; 0 = off)."),
    _m("adloop_server_explore_eligible_ads", "gauge", "server", (),
       "Servable ads this server has shown fewer than ADLOOP_SERVER_EXPLORE_MAX_SHOWN "
       "times (the exploration pool before the slate's own ads are excluded); 0 means "
       "exploration has nothing left to show."),
    _m("adloop_server_explore_expected_value_total", "counter", "server", ("slot",),
       "Expected value per impression summed over exploration slots, of the ranked ad each "
       "one replaced and of the ad drawn; the difference of their rates is what "
       "exploration costs.", "slot: ranked, explored"),
    _m("adloop_server_event_loop_lag_seconds", "gauge", "server", (),
       "How late the HTTP event loop runs a 10 ms timer (EWMA); above the latency target "
       "at the narrowest beams, requests are shed with 429."),
    _m("adloop_server_impressions_produced_total", "counter", "server", (),
       "Impressions acknowledged by Kafka."),
    _m("adloop_server_impressions_dropped_total", "counter", "server", ("reason",),
       "Impressions not logged.", "reason: overflow (bounded buffer full), produce_error, "
       "shutdown (only without a spool)"),
    _m("adloop_server_impressions_replayed_total", "counter", "server", (),
       "Spooled impressions an earlier server process left unacknowledged, produced again "
       "at start (after a crash; the joiner drops copies already joined)."),
    _m("adloop_server_impression_buffer_records", "gauge", "server", (),
       "Impressions waiting to be produced."),
    _m("adloop_server_swaps_total", "counter", "server", ("result",),
       "Snapshot loads, by result.", "result: ok, rollback, or the step that refused it "
       "(manifest, fetch, checksum, load, parity, nan, warmup), or stale (an announcement "
       "of data older than the serving version's)"),
    _m("adloop_server_snapshot_load_seconds", "histogram", "server", (),
       "Fetch + verify + load + warm-up + parity check of one snapshot."),
    _m("adloop_server_model_version_info", "gauge", "server", ("version",),
       "1 for the version the online bucket serves (every request without an A/B "
       "test), 0 for the other kept versions (rollback targets).",
       "version: the kept versions only (--keep-versions, default 3); evicted ones are removed"),
    _m("adloop_server_ab_requests_total", "counter", "server", ("bucket",),
       "Valid /v1/recommend requests by the live A/B bucket their user is assigned to "
       "(a stable hash of the user id), whatever the answer; only with a control bucket "
       "(ADLOOP_SERVER_CONTROL_SHARE > 0).", "bucket: online, control"),
    _m("adloop_server_ab_impressions_total", "counter", "server", ("bucket",),
       "Slates served (one impression each) by the bucket whose model served them; a "
       "control user served by the online model before the control model is loaded "
       "counts in neither (adloop_server_ab_control_unavailable_total).",
       "bucket: online, control"),
    _m("adloop_server_ab_control_unavailable_total", "counter", "server", (),
       "Control users served by the online model outside the test (impression bucket "
       "\"\") because the pinned control model is not loaded yet."),
    _m("adloop_server_ab_model_version_info", "gauge", "server", ("bucket", "version"),
       "1 for the model version each live A/B bucket serves (the control's once loaded); "
       "adloop_server_model_version_info stays the online bucket's.",
       "bucket: online, control; version: one per bucket (an old one is removed)"),
    _m("adloop_server_ab_control_share_ratio", "gauge", "server", (),
       "Configured share of users in the control bucket (ADLOOP_SERVER_CONTROL_SHARE; "
       "0 = no A/B test)."),
    _m("adloop_server_provider_info", "gauge", "server", ("provider",),
       "1 for the onnxruntime execution provider in use.",
       "provider: CUDAExecutionProvider, CPUExecutionProvider"),
    _m("adloop_server_snapshot_data_watermark_timestamp_seconds", "gauge", "server", (),
       "Newest event time the served snapshot was trained on."),
    _m("adloop_server_model_swap_timestamp_seconds", "gauge", "server", (),
       "Wall-clock time of the last model swap."),
    _m("adloop_server_servable_ads", "gauge", "server", (), "Ads in the serving trie."),
    _m("adloop_server_catalog_ads", "gauge", "server", (), "Ads known from the `ads` topic."),
    _m("adloop_server_catalog_organic_items", "gauge", "server", (),
       "Organic items known from the `organic-items` topic."),
    _m("adloop_server_organic_items", "gauge", "server", (),
       "Servable organic items (videos, articles): in the serving snapshot's organic trie "
       "and active on `organic-items` (a removed or deleted item leaves at once); 0 = the "
       "snapshot has none (ads only)."),
    _m("adloop_server_organic_served_total", "counter", "server", (),
       "Organic items served in mixed feeds (requests with organic_k > 0)."),
    _m("adloop_server_organic_search_seconds", "histogram", "server", (),
       "Time of the organic beam search of one batch (its mixed-feed requests only)."),
    _m("adloop_server_organic_unavailable_total", "counter", "server", (),
       "Mixed-feed requests (organic_k > 0) answered with ads only because the serving "
       "snapshot has no organic items (no organic_ids in its manifest)."),
    _m("adloop_server_bad_records_total", "counter", "server", ("topic", "reason"),
       "Records the server's topic followers skipped (and dead-lettered once per offset): "
       "undecodable, refused by the model-updates check (signature, snapshot bases), or "
       "breaking the handler.",
       "topic: ads, organic-items, model-updates; reason: the DlqReason enum (handler_error: "
       "the record decoded but the server could not use it; unsigned, bad_signature, "
       "unknown_key, uri_outside_bases: a refused model-updates record)"),
    _m("adloop_server_model_updates_refused_total", "counter", "server", ("reason",),
       "`model-updates` records refused before anything they name was fetched, and "
       "dead-lettered: no valid signature under the server's keyring, or a snapshot URI "
       "outside its snapshot bases (docs/security.md). Also counted in "
       "adloop_server_bad_records_total{topic=\"model-updates\"}.",
       "reason: unsigned, bad_signature, unknown_key, uri_outside_bases"),
    _m("adloop_follow_retries_total", "counter", "server", ("topic",),
       "Times a topic follower reopened its topic after a fault that can heal (broker "
       "unreachable, topic missing); backoff 0.5 s doubling to 5 s. Bad records are never "
       "retried.", "topic: ads, organic-items, model-updates"),
    # --- joiner: adloop join (streams/joiner.py) -----------------------------------------
    _m("adloop_join_feedback_total", "counter", "join", ("kind",), "Feedback lists emitted.",
       "kind: provisional, final, correction"),
    _m("adloop_join_corrections_total", "counter", "join", (),
       "Correction lists emitted (a click, conversion or organic engagement after the list "
       "was emitted)."),
    _m("adloop_join_events_total", "counter", "join", ("topic", "outcome"),
       "Input records processed, by topic and outcome. A click/conversion/organic "
       "engagement held for its impression is counted as `held` on arrival and again "
       "(applied, late or orphan) when its impression arrives, so `applied` of clicks "
       "counts every click that reached a list.",
       "topic: impressions, clicks, conversions, organic-engagements; outcome: applied, "
       "held, duplicate, late, orphan, invalid, handler_error, end_of_stream"),
    _m("adloop_join_organic_engagements_total", "counter", "join", ("action",),
       "Organic engagements joined into their impression's feedback (counted once: "
       "duplicates and dead-lettered ones are not).", "action: view, like, dwell"),
    _m("adloop_join_late_total", "counter", "join", ("topic",),
       "Records dead-lettered as late (after their attribution window closed).",
       "topic: impressions, clicks, conversions, organic-engagements"),
    _m("adloop_join_orphan_total", "counter", "join", ("topic",),
       "Records dead-lettered as orphan (their impression never arrived, or it did not "
       "show the ad or organic item they name).",
       "topic: clicks, conversions, organic-engagements"),
    _m("adloop_join_reconciled_total", "counter", "join", (),
       "Feedback lists found on the output whose table mark was lost (after a restart)."),
    _m("adloop_join_table_requests", "gauge", "join", (), "Request ids held in the join table."),
    _m("adloop_join_table_bytes", "gauge", "join", (), "Encoded size of the join state."),
    _m("adloop_join_commits_total", "counter", "join", (), "Completed commit protocols."),
    _m("adloop_join_process_resident_memory_bytes", "gauge", "join", (),
       "Resident memory of the joiner process."),
    _m("adloop_join_rejoins_total", "counter", "join", (),
       "Fresh group members after a long stretch with nothing assigned (kafka-python can "
       "leave a member idle in its group after an early rebalance)."),
    _m("adloop_join_lag_records", "gauge", "join", ("topic", "partition"),
       "Unread records per input topic and partition (the joiner's consumer lag).",
       "topic: impressions, clicks, conversions, organic-engagements; partition: 0..3"),
    _m("adloop_join_watermark_seconds", "gauge", "join", ("partition",),
       "Event-time watermark per partition (Unix seconds).", "partition: 0..3"),
    _m("adloop_join_elapsed_seconds", "histogram", "join", ("kind",),
       "Event time from impression to feedback emission.", "kind: provisional, final, "
       "correction"),
    # --- learner: adloop learn (learner/online.py, learner/publish.py) -------------------
    _m("adloop_learner_no_preference_lists_total", "counter", "learn", ("reason",),
       "Lists taken for training that state no preference (RSPO learns nothing from them; "
       "only the VSL and value terms do). Mostly one_item: a log of one-ad slates trains no "
       "ranking.", "reason: one_item, equal_rewards"),
    _m("adloop_learner_updates_total", "counter", "learn", (), "RSPO optimizer steps."),
    _m("adloop_learner_lists_total", "counter", "learn", ("outcome",),
       "Feedback lists consumed, by what happened to them.",
       "outcome: trained, holdout, not_final, unchanged, handler_error (not trainable: "
       "dead-lettered)"),
    _m("adloop_learner_replayed_lists_total", "counter", "learn", (),
       "Lists re-used from the replay buffer (against forgetting)."),
    _m("adloop_learner_loss", "gauge", "learn", ("term",), "Latest loss, by term.",
       "term: loss (total), rspo, vsl, value, hepo"),
    _m("adloop_learner_mean_reward", "gauge", "learn", (),
       "Mean realized reward per item of the last batch."),
    _m("adloop_learner_kl_reference", "gauge", "learn", (),
       "Sample KL(reference ‖ policy) on the last batch's items."),
    _m("adloop_learner_update_seconds", "histogram", "learn", (), "Wall time of one RSPO step."),
    _m("adloop_learner_data_watermark_timestamp_seconds", "gauge", "learn", (),
       "Newest event time trained on."),
    _m("adloop_learner_last_publish_timestamp_seconds", "gauge", "learn", (),
       "Wall-clock time of the last published snapshot."),
    _m("adloop_learner_freshness_seconds", "histogram", "learn", (),
       "Newest trained record's Kafka append time to the snapshot being announced."),
    _m("adloop_learner_model_version", "gauge", "learn", (),
       "Number of the last published version."),
    _m("adloop_learner_new_ads_total", "counter", "learn", (), "Ads that received an id online."),
    _m("adloop_learner_new_organic_items_total", "counter", "learn", (),
       "Organic items (videos, articles) that received an id online."),
    _m("adloop_learner_kafka_errors_total", "counter", "learn", (),
       "Loop steps interrupted by an unreachable Kafka (the step is retried with backoff; "
       "nothing trained is lost)."),
    _m("adloop_learner_holdout_ndcg", "gauge", "learn", ("model",),
       "Online-holdout value-NDCG.", "model: serving, candidate"),
    _m("adloop_learner_holdout_value", "gauge", "learn", ("model",),
       "Value-weighted off-policy estimate (money per impression) on the held-out lists the "
       "promotion guard compares.", "model: candidate, serving, baseline, best"),
    _m("adloop_learner_guard_value", "gauge", "learn", ("model", "estimate"),
       "The promotion guard's estimate (money per impression) on the held-out lists, in "
       "effect: the off-policy estimate (snips by default, or dr) of each model's served "
       "slate on the lists with logging propensities, or holdout_value after a fallback or "
       "with --guard-estimate holdout_value.",
       "model: candidate, serving, baseline, best; estimate: holdout_value, snips, dr"),
    _m("adloop_learner_guard_fallback_total", "counter", "learn", ("reason",),
       "Publishes whose --guard-estimate snips/dr fell back to holdout_value (warned once "
       "per reason).", "reason: no_propensities (no held-out list carries logging "
       "propensities), no_servable_ads (no servable ad known to the tokenizer), "
       "unsupported (a model compared serves fewer than 30 of the held-out items at their "
       "position, or its weights' effective sample size is below 30)"),
    _m("adloop_learner_export_seconds", "histogram", "learn", (),
       "Time to export a snapshot to ONNX."),
    _m("adloop_learner_validation_seconds", "histogram", "learn", (),
       "Time to check a snapshot (parity, holdout) before publishing."),
    _m("adloop_learner_snapshots_published_total", "counter", "learn", (),
       "Snapshots stored and announced on `model-updates`."),
    _m("adloop_learner_snapshots_refused_total", "counter", "learn", ("reason",),
       "Snapshots not published: refused by the promotion guard, or the store was "
       "unreachable.", "reason: nan, parity, regression, store_unavailable"),
    _m("adloop_learner_serving_since_timestamp_seconds", "gauge", "learn", (),
       "Wall time the version the learner last announced (the serving one) was announced; "
       "with candidates refused in a row, how long a stale version has been kept."),
    _m("adloop_learner_candidates_refused_in_a_row", "gauge", "learn", (),
       "Candidates the promotion guard refused since the serving version was announced "
       "(0 after each promotion)."),
    # --- learner: the live A/B test (learner/abmonitor.py, docs/abtest.md) -------------
    _m("adloop_learner_abtest_requests_total", "counter", "learn", ("bucket",),
       "Final feedback records (requests) seen, by A/B bucket.", _BUCKETS),
    _m("adloop_learner_abtest_revenue_total", "counter", "learn", ("bucket",),
       "Realized revenue (sum of the items' rewards) of the final feedback records.",
       _BUCKETS),
    _m("adloop_learner_abtest_items_total", "counter", "learn", ("bucket",),
       "Ads shown in the final feedback records.", _BUCKETS),
    _m("adloop_learner_abtest_clicks_total", "counter", "learn", ("bucket",),
       "Clicks in the final feedback records.", _BUCKETS),
    _m("adloop_learner_abtest_conversions_total", "counter", "learn", ("bucket",),
       "Conversions in the final feedback records.", _BUCKETS),
    _m("adloop_learner_abtest_epoch_requests", "gauge", "learn", ("bucket",),
       "Requests in the current test epoch.", "bucket: online, control"),
    _m("adloop_learner_abtest_rpm", "gauge", "learn", ("bucket",),
       "Realized revenue per 1000 requests in the current test epoch.",
       "bucket: online, control"),
    _m("adloop_learner_abtest_ctr", "gauge", "learn", ("bucket",),
       "Clicks per ad shown in the current test epoch.", "bucket: online, control"),
    _m("adloop_learner_abtest_cvr", "gauge", "learn", ("bucket",),
       "Conversions per click in the current test epoch.", "bucket: online, control"),
    _m("adloop_learner_abtest_rpm_difference", "gauge", "learn", ("stat",),
       "Online minus control revenue per 1000 requests in the current test epoch, with the "
       "always-valid interval of the sequential test.", "stat: estimate, lower, upper"),
    _m("adloop_learner_abtest_decisions_total", "counter", "learn", ("decision",),
       "Conclusive results of the sequential test.", "decision: online_worse, online_better"),
    _m("adloop_learner_abtest_rollbacks_total", "counter", "learn", ("result",),
       "What followed an online_worse decision.", "result: published (an earlier version "
       "re-announced), no_candidate, failed (store unreadable), disabled (rollback off)"),
    _m("adloop_learner_abtest_promotion_held", "gauge", "learn", (),
       "1 while no new version is promoted after an online_worse decision."),
    _m("adloop_learner_abtest_epoch_start_timestamp_seconds", "gauge", "learn", (),
       "Wall time the current test epoch started (start, decision or rollback)."),
    # --- traffic: adloop replay (traffic/driver.py) -------------------------------------
    _m("adloop_traffic_requests_total", "counter", "replay", ("outcome",),
       "Recommend requests, by outcome.", "outcome: ok, shed, unavailable, timeout, "
       "unreachable, http_error, bad_response, error, client_overload"),
    _m("adloop_traffic_request_latency_seconds", "histogram", "replay", (),
       "Wall time from sending a recommend request to its answer (client side)."),
    _m("adloop_traffic_impressions_total", "counter", "replay", (), "Slate items shown to users."),
    _m("adloop_traffic_clicks_total", "counter", "replay", (),
       "Clicks produced (at their event time)."),
    _m("adloop_traffic_conversions_total", "counter", "replay", (),
       "Conversions produced (at their event time)."),
    _m("adloop_traffic_revenue_total", "counter", "replay", (),
       "Realized reward booked when responses are sampled (currency units)."),
    _m("adloop_traffic_organic_impressions_total", "counter", "replay", (),
       "Organic items shown to users in mixed feeds."),
    _m("adloop_traffic_organic_engagements_total", "counter", "replay", ("action",),
       "Organic engagement events produced (at their event time), by action.",
       "action: view, like, dwell"),
    _m("adloop_traffic_organic_dwell_seconds_total", "counter", "replay", (),
       "Seconds spent on organic items (the dwell events produced)."),
    _m("adloop_traffic_ad_events_total", "counter", "replay", ("status",),
       "Ad records produced, by status.", "status: the Ad status enum (active, paused, ...)"),
    _m("adloop_traffic_pending_events", "gauge", "replay", (),
       "Delayed clicks, conversions and organic engagements waiting for their event time."),
    _m("adloop_traffic_sim_time_seconds", "gauge", "replay", (),
       "The simulator's clock (event time, Unix seconds)."),
    _m("adloop_traffic_requests_in_flight", "gauge", "replay", (),
       "Recommend requests awaiting an answer."),
    _m("adloop_traffic_bad_lines_total", "counter", "replay", ("reason",),
       "Recorded-log lines that could not be read, by reason.", "reason: fixed parse-error set"),
    _m("adloop_traffic_replay_gaps_clamped_total", "counter", "replay", ("direction",),
       "Recorded-log time jumps larger than max_gap_s that replay shortened instead of "
       "waiting for.", "direction: forward, backward"),
    # --- offline pretraining: adloop pretrain -------------------------------------------
    _m("adloop_stats_events_total", "counter", "stats", ("topic", "outcome"),
       "Records the stats stage read, by topic and outcome.",
       "topic: ads, feedback, finals; outcome: counted, skipped (not a final list), bad"),
    _m("adloop_stats_industry_impressions_total", "counter", "stats", ("industry",),
       "Ad impressions in final feedback lists, by industry (at-least-once).",
       "industry: the world's industries, unknown"),
    _m("adloop_stats_industry_clicks_total", "counter", "stats", ("industry",),
       "Clicked ads in final feedback lists, by industry (at-least-once).",
       "industry: the world's industries, unknown"),
    _m("adloop_stats_industry_conversions_total", "counter", "stats", ("industry",),
       "Converted ads in final feedback lists, by industry (at-least-once).",
       "industry: the world's industries, unknown"),
    _m("adloop_stats_industry_revenue_total", "counter", "stats", ("industry",),
       "Revenue (sum of rewards) in final feedback lists, by industry (at-least-once).",
       "industry: the world's industries, unknown"),
    _m("adloop_stats_top_revenue", "gauge", "stats", ("dimension", "rank", "id"),
       "Revenue of the top-N ads and advertisers in the newest complete tumbling window.",
       "dimension: ad, advertiser; rank: 1..top_n; id: the ad or advertiser at that rank "
       "(at most top_n series per dimension at a time, replaced each second)"),
    _m("adloop_stats_window_end_seconds", "gauge", "stats", (),
       "Event-time end of the tumbling window the top-N gauges describe."),
    _m("adloop_stats_ad_stats_sent_total", "counter", "stats", (),
       "AdStats records the broker acknowledged."),
    _m("adloop_pretrain_steps_total", "counter", "pretrain", (),
       "Optimizer steps taken by pretraining."),
    _m("adloop_pretrain_loss", "gauge", "pretrain", ("part",), "Latest pretraining loss by part.",
       "part: vsl, mtp, total"),
    _m("adloop_pretrain_step_seconds", "histogram", "pretrain", (),
       "Wall time of one training step."),
    _m("adloop_pretrain_eval", "gauge", "pretrain", ("metric",),
       "Held-out evaluation metrics of pretraining.", "metric: recall@K, value-NDCG@K names"),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

CLIENT_DEFAULT_METRICS = (
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
    "process_start_time_seconds", "process_virtual_memory_bytes", "process_max_fds",
    "python_gc_objects_collected_total", "python_gc_collections_total", "python_info", "up",
)
"""Series every process (and Prometheus itself) provides without adloop defining them."""


def series_names(metric: Metric) -> tuple[str, ...]:
    """The sample names a metric produces on ``/metrics`` (histograms have three)."""
    if metric.kind == "histogram":
        return (f"{metric.name}_bucket", f"{metric.name}_sum", f"{metric.name}_count")
    return (metric.name,)


def naming_problems(name: str, kind: str, labels: tuple[str, ...]) -> list[str]:
    """What is wrong with one metric definition under adloop's rules (empty when fine)."""
    problems = []
    if not name.startswith("adloop_"):
        problems.append("does not start with adloop_")
    if name != name.lower():
        problems.append("is not lower snake_case")
    if kind == "counter" and not name.endswith("_total"):
        problems.append("is a counter not ending in _total")
    if kind != "counter" and name.endswith("_total"):
        problems.append("ends in _total but is not a counter")
    if kind == "histogram" and not name.endswith(HISTOGRAM_UNITS):
        problems.append(f"is a histogram without a unit suffix {HISTOGRAM_UNITS}")
    for bad in ("_milliseconds", "_ms", "_millis", "_kb", "_mb", "_percent", "_minutes",
                "_hours"):
        if name.endswith(bad) or f"{bad}_" in name:
            problems.append(f"uses a non-base unit ({bad})")
    if ("_timestamp" in name or "_time" in name) and kind != "counter" \
            and not name.endswith("_seconds") and not name.endswith("_info"):
        problems.append("a time must end in _timestamp_seconds or _seconds")
    for label in labels:
        if label in FORBIDDEN_LABELS or label.endswith("_id"):
            problems.append(f"has unbounded label {label!r}")
        if label == "le" or label == "quantile":
            problems.append(f"uses reserved label {label!r}")
    return problems


@dataclass(frozen=True)
class CodeMetric:
    """A metric definition found in the code: ``counter("adloop_...", ..., ("label",))``."""

    name: str
    kind: str
    labels: tuple[str, ...]
    where: str


_CONSTRUCTORS = {"counter": "counter", "gauge": "gauge", "histogram": "histogram",
                 "Counter": "counter", "Gauge": "gauge", "Histogram": "histogram",
                 "Summary": "summary", "Info": "info", "Enum": "enum"}


def _literal_labels(node: ast.expr | None) -> tuple[str, ...] | None:
    if node is None:
        return ()
    if isinstance(node, ast.Tuple | ast.List) and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return tuple(str(e.value) for e in node.elts if isinstance(e, ast.Constant))
    return None


def code_metrics(packages: tuple[str, ...] = ("streams", "traffic", "learner", "server")
                 ) -> list[CodeMetric]:
    """Every metric constructor call with a literal name in the given packages."""
    found = []
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            try:
                tree = ast.parse(path.read_text(), str(path))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func
                fname = fn.id if isinstance(fn, ast.Name) else (
                    fn.attr if isinstance(fn, ast.Attribute) else "")
                if fname not in _CONSTRUCTORS or not node.args:
                    continue
                first = node.args[0]
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    continue
                label_node = node.args[2] if len(node.args) > 2 else next(
                    (k.value for k in node.keywords if k.arg in ("labels", "labelnames")), None)
                labels = _literal_labels(label_node)
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found.append(CodeMetric(first.value, _CONSTRUCTORS[fname],
                                        labels if labels is not None else ("<dynamic>",), where))
    return found


_PROCESS_TITLES = {
    "all": "Every process (Kafka helpers, `streams.metrics`)",
    "server": "Server — `adloop serve`",
    "join": "Joiner — `adloop join`",
    "stats": "Ad statistics — `adloop stats` (faust-streaming, at-least-once)",
    "learn": "Learner — `adloop learn`",
    "replay": "Traffic — `adloop replay`",
    "pretrain": "Offline pretraining — `adloop pretrain`",
}


def render_markdown() -> str:
    """``docs/metrics.md``: the inventory as one table per process."""
    out = [
        "# Metrics",
        "",
        "<!-- Generated by `python -m deploy.observability.dashboards` from",
        "     deploy/observability/inventory.py; edit that file, not this one. -->",
        "",
        "Every adloop process serves `/metrics` (Prometheus text format), `/healthz` and",
        "`/readyz` on one port (`streams.metrics.start_metrics_server`; the server serves",
        "them on its HTTP port). Names follow Prometheus conventions: the `adloop_` prefix,",
        "base units in the name (`_seconds`, `_bytes`, `_timestamp_seconds` for Unix",
        "times), `_total` for counters, histograms (not summaries) for latency and",
        "freshness so they aggregate across replicas, and label values from small fixed",
        "sets — never a user, request, ad or event id. `tests/observability/"
        "test_metric_names.py`",
        "checks the code's metric definitions against these rules and against this table.",
        "",
        "Histograms expose `_bucket{le}`, `_sum` and `_count`. Latency histograms use",
        "`streams.metrics.LATENCY_BUCKETS` (0.5 ms .. 10 s), freshness and lag histograms",
        "`FRESHNESS_BUCKETS` (0.1 s .. 1 h). Every process also exposes prometheus-client's",
        "defaults (`process_cpu_seconds_total`, `process_resident_memory_bytes`,",
        "`process_open_fds`, `process_start_time_seconds`, `python_gc_*`, `python_info`);",
        "Prometheus adds `up` per target. A change of `process_start_time_seconds` is a",
        "restart (alert `AdloopProcessRestarted`).",
    ]
    if any(m.planned for m in METRICS):
        out += ["", "*planned*: read by the dashboards/rules, but the component that exposes",
                "it does not define it yet."]
    for process, title in _PROCESS_TITLES.items():
        rows = [m for m in METRICS if m.process == process]
        out += ["", f"## {title}", "",
                "| name | type | labels | meaning |", "|---|---|---|---|"]
        for m in rows:
            labels = ", ".join(f"`{lb}`" for lb in m.labels) or "—"
            if m.label_values:
                labels += f" ({m.label_values})"
            status = " *planned*" if m.planned else ""
            out.append(f"| `{m.name}`{status} | {m.kind} | {labels} | {m.meaning} |")
    return "\n".join(out) + "\n"
