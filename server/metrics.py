"""The serving worker's Prometheus metrics (one process-wide registry, ``adloop_server_``)."""

from __future__ import annotations

from streams.metrics import counter, gauge, histogram

REQUESTS = counter("adloop_server_requests_total", "HTTP requests to /v1/recommend by status code.",
                   ("code",))
REQUEST_SECONDS = histogram("adloop_server_request_duration_seconds",
                            "Time from request arrival to response, /v1/recommend.")
QUEUE_SECONDS = histogram("adloop_server_queue_wait_seconds",
                          "Time a request waited for its batch to start.")
BATCH_SIZE = histogram("adloop_server_batch_size", "Requests per model call.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_SECONDS = histogram("adloop_server_batch_duration_seconds",
                          "Model time per batch (encoder, beam search, value heads).")
QUEUE_DEPTH = gauge("adloop_server_queue_depth", "Requests waiting for a batch.")
BEAM_WIDTH = gauge("adloop_server_beam_width", "Beam width in use per id level.", ("level",))
BEAM_SCALE = gauge("adloop_server_beam_scale_ratio",
                   "Load controller's beam scale alpha in (0, 1].")
REQUEST_BEAM_WIDTH = histogram("adloop_server_request_beam_width",
                               "Beam width used per request and level.", ("level",),
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
CONTEXT_UNMATCHED = counter(
    "adloop_server_context_unmatched_total",
    "Requests whose context has no key the model reads (its manifest's context_features): "
    "the model ranks them as if no context were given.")
SHED = counter("adloop_server_shed_total",
               "Requests refused with 429 (narrowest beams could not hold the SLO).")
BATCHES_DURING_SWAP = counter(
    "adloop_server_batches_during_swap_total",
    "Batches that overlapped a snapshot swap: the load controller neither narrows beams "
    "nor updates its service time from them.")
LOOP_LAG = gauge("adloop_server_event_loop_lag_seconds",
                 "How late the HTTP event loop runs a 10 ms timer (EWMA).")
IMPRESSIONS = counter("adloop_server_impressions_produced_total",
                      "Impressions acknowledged by Kafka.")
IMPRESSIONS_DROPPED = counter("adloop_server_impressions_dropped_total",
                              "Impressions not logged: buffer overflow or produce failure.",
                              ("reason",))
IMPRESSIONS_REPLAYED = counter("adloop_server_impressions_replayed_total",
                               "Spooled impressions of an earlier process produced at start.")
IMPRESSION_BUFFER = gauge("adloop_server_impression_buffer_records",
                          "Impressions waiting to be produced.")
SWAPS = counter("adloop_server_swaps_total",
                "Snapshot loads by result (ok, rollback, or the failed step).", ("result",))
LOAD_SECONDS = histogram("adloop_server_snapshot_load_seconds",
                         "Fetch + verify + load + warm-up + parity of one snapshot.",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
MODEL_INFO = gauge("adloop_server_model_version_info",
                   "1 for the serving version, 0 for other kept versions.", ("version",))
PROVIDER_INFO = gauge("adloop_server_provider_info",
                      "1 for the onnxruntime execution provider in use.", ("provider",))
WATERMARK = gauge("adloop_server_snapshot_data_watermark_timestamp_seconds",
                  "Newest event time the serving snapshot was trained on.")
SWAP_TIME = gauge("adloop_server_model_swap_timestamp_seconds",
                  "Wall-clock time of the last model swap.")
SERVABLE_ADS = gauge("adloop_server_servable_ads", "Ads in the serving trie.")
CATALOG_ADS = gauge("adloop_server_catalog_ads", "Ads known from the ads topic.")
CATALOG_ORGANIC = gauge("adloop_server_catalog_organic_items",
                        "Organic items known from the organic-items topic.")
BAD_RECORDS = counter("adloop_server_bad_records_total",
                      "Records the server's followers skipped: undecodable (by reason) or "
                      "breaking the handler (handler_error).", ("topic", "reason"))
UPDATES_REFUSED = counter(
    "adloop_server_model_updates_refused_total",
    "model-updates records refused before anything was fetched (dead-lettered): unsigned, "
    "bad_signature, unknown_key or uri_outside_bases.", ("reason",))
FOLLOW_RETRIES = counter("adloop_follow_retries_total",
                         "Times a follower reopened its topic after a fault that can heal "
                         "(broker unreachable, topic missing), by topic.", ("topic",))
RANKING_MODE = counter("adloop_server_ranking_mode_total",
                       "Requests by how their ads' candidates were found: catalogue (every "
                       "servable ad scored by the value heads) or beams (constrained beam "
                       "search, then the value heads on the final beams).", ("mode",))
EXPLORED = counter("adloop_server_explored_total",
                   "Requests whose last slot went to an exploration draw (a low-exposure ad).")
EXPLORE_RATE = gauge("adloop_server_explore_ratio",
                     "Configured exploration probability per request (ADLOOP_SERVER_EXPLORE).")
EXPLORE_ELIGIBLE = gauge("adloop_server_explore_eligible_ads",
                         "Servable ads this server has shown fewer than explore_max_shown "
                         "times (the exploration pool before excluding the slate).")
EXPLORE_VALUE = counter("adloop_server_explore_expected_value_total",
                        "Expected value per impression summed over exploration slots: of the "
                        "ranked ad each one replaced (slot=ranked) and of the ad drawn "
                        "(slot=explored); their difference is what exploration costs.",
                        ("slot",))
ORGANIC_SERVED = counter("adloop_server_organic_served_total",
                        "Organic items (videos, articles) served in mixed feeds.")
ORGANIC_SECONDS = histogram("adloop_server_organic_search_seconds",
                            "Time of the organic beam search of one batch (its mixed-feed "
                            "requests only).")
ORGANIC_UNAVAILABLE = counter(
    "adloop_server_organic_unavailable_total",
    "Mixed-feed requests (organic_k > 0) answered with ads only because the serving "
    "snapshot has no organic items (no organic_ids in its manifest).")
ORGANIC_ITEMS = gauge("adloop_server_organic_items",
                      "Servable organic items: in the serving snapshot's organic table and, "
                      "for a server following organic-items, active there (0 = ads only).")
ORGANIC_BEAM_WIDTH = gauge("adloop_server_organic_beam_width",
                           "Base beam width per level of the organic search in use: "
                           "organic_beam scaled by the load controller's alpha, like the "
                           "ads' beams (a request never searches narrower than its "
                           "organic_k).")
