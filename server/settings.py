"""Settings of ``adloop serve`` (env ``ADLOOP_SERVER_*``, flags ``--name``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.settings import cache_dir, env_path, env_secret


def _default_server_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def default_snapshot_bases() -> str:
    """Where the learner stores and announces snapshots by default: its public base URL
    (``ADLOOP_SNAPSHOT_BASE_URL``) when set, and its store (``ADLOOP_SNAPSHOT_STORE``,
    else ``runs/snapshots``)."""
    bases = [os.environ.get("ADLOOP_SNAPSHOT_BASE_URL") or "",
             os.environ.get("ADLOOP_SNAPSHOT_STORE") or "runs/snapshots"]
    return ",".join(b for b in bases if b)


class ServerSettings(BaseSettings):
    """Everything the serving worker can be told. Kafka comes from ``KafkaSettings``."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_SERVER_", extra="ignore")

    host: str = Field("127.0.0.1", description="HTTP listen address")
    port: int = Field(8080, description="HTTP port (0 = any free port)")
    server_id: str = Field(default_factory=_default_server_id,
                           description="written on every impression")
    model_name: str = Field("adloop", description="model-updates records of this name are served")
    snapshot: Path | None = Field(None, description="load this snapshot directory at start "
                                  "(before/besides following model-updates)")
    follow_model_updates: bool = Field(True, description="follow the model-updates topic")
    snapshot_bases: str = Field(
        default_factory=default_snapshot_bases,
        description="comma-separated prefixes snapshots may be fetched from: directories "
        "(or file:// URIs), http(s):// or s3:// URL prefixes; a model-updates record "
        "naming anything else is dead-lettered unfetched (default: the learner's default "
        "store, ADLOOP_SNAPSHOT_STORE or runs/snapshots, and ADLOOP_SNAPSHOT_BASE_URL)")
    update_keys: SecretStr | None = Field(
        default_factory=lambda: env_secret("ADLOOP_UPDATE_KEYS"),
        description="keyring that model-updates signatures are checked with, "
        "'key_id:secret,...' (environment ADLOOP_SERVER_UPDATE_KEYS or ADLOOP_UPDATE_KEYS "
        "only, never a flag)")
    update_keys_file: Path | None = Field(
        default_factory=lambda: env_path("ADLOOP_UPDATE_KEYS_FILE"),
        description="file with the keyring, one key_id:secret per line (used when "
        "update_keys is unset; unset too: <cache>/model-updates.keys, generated on first "
        "use for the embedded stack)")
    cache_dir: Path = Field(default_factory=lambda: cache_dir() / "server-snapshots",
                            description="local copies of fetched snapshots")
    keep_versions: int = Field(3, ge=1, description="versions kept for rollback")
    dead_letter_group: str = Field(
        "adloop-dead-letters", description="consumer group marking the ads/model-updates "
        "offsets already dead-lettered (shared with the learner; empty = only count them)")

    # execution
    provider: str = Field("auto", description="auto | cpu | cuda")
    cuda_device_id: int = Field(0, description="CUDA device for the cuda provider")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0 = auto)")
    workers: int = Field(1, ge=1, description="model-execution threads (one batch each)")

    # batching and dynamic beams
    max_batch_size: int = Field(16, ge=1, description="requests per model call at most")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill up")
    beam_schedule: str = Field("16,16,8", description="base beam width per id level, "
                               "comma separated; the last value repeats for deeper levels")
    min_beam_width: int = Field(1, ge=1, description="no level goes below this width")
    dynamic_beams: bool = Field(True, description="scale beams with load (else fixed widths)")
    alpha_min: float = Field(0.125, gt=0, le=1, description="smallest beam scale")
    slo_ms: float = Field(50.0, gt=0, description="latency target inside the server")
    max_queue: int = Field(2048, ge=1, description="queued requests beyond this get 429")

    score_catalogue_max: int = Field(500, ge=0, description="a servable catalogue of at "
                                     "most this many ads is scored whole by the value heads "
                                     "(every ad a candidate of every request, ranked by "
                                     "expected value) instead of searched by beams; "
                                     "0 = always beams")
    exposure_users: int = Field(200_000, ge=0, description="users whose impressions per "
                                "ad the server counts (least recently served forgotten "
                                "first): the value heads' exposure input and each "
                                "impression's SlateItem.exposure; with replicas, balance on "
                                "the user id; 0 = no counting (every count 0)")

    # mixed feed (organic items ranked by the same model)
    organic_beam: int = Field(8, ge=1, le=256, description="beam width per level of the "
                              "organic search of a mixed-feed request (organic_k > 0), "
                              "scaled by the load controller like the ads' beams; "
                              "never below organic_k")

    # exploration (server/explore.py)
    explore: float = Field(0.0, ge=0, le=1, description="probability per request that the "
                           "last slot goes to a low-exposure ad drawn uniformly (0 = off)")
    explore_max_shown: int = Field(50, ge=1, description="an ad this server has shown this "
                                   "many times is no longer drawn for exploration")
    explore_seed: int | None = Field(None, description="seed of the exploration draws "
                                     "(reproducible runs); unset = fresh entropy")

    # live A/B test (server/abtest.py): a control bucket served by a pinned model
    control_share: float = Field(0.0, ge=0, lt=1, description="share of users (a stable "
                                 "hash of the user id) served by the control model; the rest "
                                 "get the online model (0 = no control bucket)")
    control_version: str = Field("pretrained", description="the control model: "
                                 "'pretrained' (the first version this server loaded) or a "
                                 "version id such as v003")
    ab_salt: str = Field("adloop-ab", description="salt of the user-id hash that assigns "
                         "buckets (a new salt re-randomises users)")

    # request limits
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="request bodies above get 413")

    # impressions
    log_impressions: bool = Field(True, description="produce an impression per served slate")
    impression_buffer: int = Field(10_000, ge=1, description="impressions waiting for Kafka")
    log_beams: int = Field(32, ge=0, le=512, description="final beams per impression "
                           "logged with the slate, best expected value first (the learner's "
                           "HEPO sibling groups; 0 = none)")
    impression_spool: bool = Field(True, description="spool served impressions to local "
                                   "files until Kafka acknowledges them (survives kill -9)")
    impression_spool_dir: Path | None = Field(
        None, description="spool directory, one per server process "
        "(default: <cache-dir>/impression-spool)")

    def spool_dir(self) -> Path | None:
        if not (self.log_impressions and self.impression_spool):
            return None
        return self.impression_spool_dir or self.cache_dir / "impression-spool"

    # admin
    admin_token: str | None = Field(None, description="bearer token for /v1/models*; "
                                    "unset = admin endpoints disabled")

    def schedule(self) -> list[int]:
        return parse_schedule(self.beam_schedule)


def parse_schedule(text: str) -> list[int]:
    try:
        widths = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"beam schedule {text!r} must be comma-separated integers") from None
    if not widths or min(widths) < 1:
        raise ValueError(f"beam schedule {text!r} needs at least one width >= 1")
    return widths
