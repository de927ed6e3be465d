"""``adloop learn``: the continuous RSPO learner.

Reads ``feedback`` (training lists) and ``ads`` (new ads get ids), trains with
:class:`learner.rspo_step.OnlineLearner`, and every N updates or T seconds publishes
a snapshot through :class:`learner.publish.Publisher` and ``model-updates``.

Crash safety (the commit path, one block per step in :meth:`LearnerService.commit`):

1. flush the producer, so dead letters of everything consumed are durable;
2. write the ledger segment of every feedback record consumed since the last
   checkpoint (``ledger/<seq>.jsonl``: partition, offset, request, trained or why not);
3. write the checkpoint atomically (tmp + fsync + rename): model, optimizer, reference
   policy, tokenizer table, the consumer positions those weights correspond to, the
   version counter and any announced-but-unconfirmed model update;
4. mirror the positions to Kafka's committed offsets (informational only).

On restart the learner loads the checkpoint, deletes ledger segments newer than it
(their training was lost with the crash) and seeks to the checkpoint's positions, so
every feedback offset is trained exactly once across crashes. A training step only
ever happens with the whole polled batch, so a checkpoint never lands between a
record being consumed and its effect.

``--world-size N`` runs N data-parallel ranks of this service (:mod:`learner.distributed`):
each consumes its share of the partitions, and rank 0 writes one checkpoint holding
every rank's positions.

Live A/B test (docs/abtest.md): rank 0 feeds every final feedback record to a
:class:`learner.abmonitor.BucketMonitor` (per-bucket RPM, CTR, CVR and an always-valid
test of online against control). When the test finds the online bucket worse, the
decision is logged with its evidence and counted, promotion stops (training goes on),
and at its next loop step (not waiting for a publish to be due) the learner
re-announces the best earlier version that was not worse (or the control version)
under a new version id (:meth:`Publisher.republish`) and trains on from its weights;
promotion resumes once the restored version has served
``--abtest-resume-requests`` requests per bucket without being found worse. A candidate
the promotion guard refuses is logged and counted with the version that keeps serving
and since when, and training goes on from the best published version.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from learner.abmonitor import PROMOTION_HELD, ROLLBACKS, BucketMonitor
from learner.abtest import TestResult
from learner.beam import IdTrie
from learner.checkpoint import TOKENIZER_DIR, load_model
from learner.guard import Catalogue, GuardEstimate, GuardEstimateName
from learner.model import GenerativeRecommender, ModelConfig
from learner.publish import Publisher, SnapshotRefusedError, SnapshotStore, UpdateSigner
from learner.rspo import RSPOConfig
from learner.rspo_step import OnlineLearner, lists_to_batch, provisional_weight
from learner.tokenizer import UASIDTokenizer
from learner.topic_match import fill_topic_match
from streams.kafka_io import DeadLetterOnce, EventConsumer, EventProducer, Received
from streams.logs import get_logger
from streams.metrics import FRESHNESS_BUCKETS, counter, gauge, histogram, start_metrics_server
from streams.schemas import (
    Ad,
    DecodeFailure,
    DlqReason,
    Feedback,
    ModelUpdate,
    OrganicItem,
    decode,
    encode,
)
from streams.settings import (
    KafkaSettings,
    add_settings_arguments,
    env_path,
    env_secret,
    settings_from_args,
)
from streams.signing import default_keyring_file, load_keyring
from streams.topics import Topics

log = get_logger(__name__)

UPDATES = counter("adloop_learner_updates_total", "RSPO optimizer steps.")
LISTS = counter("adloop_learner_lists_total",
                "Feedback lists consumed, by what happened to them.", ("outcome",))
NO_PREFERENCE = counter(
    "adloop_learner_no_preference_lists_total",
    "Lists taken for training that state no preference, so the RSPO term learns nothing "
    "from them (only VSL/value do), by reason: one_item (a one-ad slate), equal_rewards "
    "(every item has the same reward).", ("reason",))
REPLAYED = counter("adloop_learner_replayed_lists_total",
                   "Lists re-used from the replay buffer (against forgetting).")
LOSS = gauge("adloop_learner_loss", "Latest loss, by term.", ("term",))
REWARD = gauge("adloop_learner_mean_reward", "Mean realized reward per item of the last batch.")
KL = gauge("adloop_learner_kl_reference", "Sample KL(π_ref ‖ π_θ) on the last batch's items.")
UPDATE_SECONDS = histogram("adloop_learner_update_seconds", "Wall time of one RSPO step.")
WATERMARK = gauge("adloop_learner_data_watermark_timestamp_seconds",
                  "Newest event time trained on.")
PUBLISH_TS = gauge("adloop_learner_last_publish_timestamp_seconds",
                   "Wall time of the last published snapshot.")
FRESHNESS = histogram("adloop_learner_freshness_seconds",
                      "Newest trained record's Kafka append time -> snapshot announced.",
                      buckets=FRESHNESS_BUCKETS)
MODEL_VERSION = gauge("adloop_learner_model_version", "Number of the last published version.")
KAFKA_ERRORS = counter("adloop_learner_kafka_errors_total",
                       "Loop steps interrupted by an unreachable Kafka (retried with backoff).")
NEW_ADS = counter("adloop_learner_new_ads_total", "Ads that received an id online.")
NEW_ORGANIC = counter("adloop_learner_new_organic_items_total",
                      "Organic items (videos, articles) that received an id online.")
HOLDOUT = gauge("adloop_learner_holdout_ndcg", "Online-holdout value-NDCG, by model.", ("model",))
HOLDOUT_VALUE = gauge("adloop_learner_holdout_value",
                      "Value-weighted off-policy estimate (money per impression) on the "
                      "held-out lists the promotion guard uses, by model (candidate, "
                      "serving, baseline, best).", ("model",))
SERVING_SINCE = gauge("adloop_learner_serving_since_timestamp_seconds",
                      "Wall time the version the learner last announced (the one serving) "
                      "was announced.")
REFUSED_IN_A_ROW = gauge("adloop_learner_candidates_refused_in_a_row",
                         "Candidates the promotion guard refused since the serving version "
                         "was announced (0 after each promotion).")
GUARD_VALUE = gauge("adloop_learner_guard_value",
                    "The promotion guard's estimate (money per impression) on the held-out "
                    "lists, by model (candidate, serving, baseline, best) and estimate in "
                    "effect (holdout_value, snips, dr).", ("model", "estimate"))

STATE_FILE = "learner_state.pt"
STATE_FORMAT = 1


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any],
                         path: Path) -> bool:
    """Load a checkpoint's optimizer state into ``opt``; a state whose parameter groups
    do not match (saved by an earlier layout, e.g. a data-parallel learner that still
    optimised the refitted linear tables) is dropped with a warning: the model's
    weights load, and the optimizer's moments start afresh. Whether it loaded."""
    try:
        opt.load_state_dict(state)
    except ValueError as e:
        log.warning("learner.optimizer_reset", path=str(path), reason=str(e))
        return False
    return True


class LearnerSettings(BaseSettings):
    """``adloop learn`` settings (env ADLOOP_LEARN_<NAME>, flags --name)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_LEARN_", extra="ignore")

    bootstrap_servers: str = os.environ.get("ADLOOP_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    topic_prefix: str = os.environ.get("ADLOOP_TOPIC_PREFIX", "")
    init_run_dir: Path = Path("runs/pretrain")
    """The pretrained model (``adloop pretrain`` run dir) to start from."""
    state_dir: Path = Path("runs/learner")
    """Checkpoints and the training ledger."""
    snapshot_store: str = os.environ.get("ADLOOP_SNAPSHOT_STORE", "runs/snapshots")
    """Directory or fsspec URL where snapshots are stored."""
    snapshot_base_url: str | None = os.environ.get("ADLOOP_SNAPSHOT_BASE_URL") or None
    """Public base URL announced instead of the store path (``http://host:port/`` of a
    web server serving the store directory); empty: announce where it is written."""
    update_keys: SecretStr | None = Field(
        default_factory=lambda: env_secret("ADLOOP_UPDATE_KEYS"),
        description="keyring that model-updates records are signed with, "
        "'key_id:secret,...' (environment ADLOOP_LEARN_UPDATE_KEYS or ADLOOP_UPDATE_KEYS "
        "only, never a flag)")
    update_keys_file: Path | None = Field(
        default_factory=lambda: env_path("ADLOOP_UPDATE_KEYS_FILE"),
        description="file with the keyring, one key_id:secret per line (used when "
        "update_keys is unset; unset too: <cache>/model-updates.keys, generated on first "
        "use for the embedded stack)")
    update_key_id: str | None = Field(
        default_factory=lambda: os.environ.get("ADLOOP_UPDATE_KEY_ID") or None,
        description="id of the keyring's key to sign with (default: the last one listed)")
    model_name: str = "adloop"
    group_id: str = "adloop-learner"
    batch_lists: int = 64
    max_wait_s: float = 1.0
    lr: float = 5e-4
    beta: float = 0.5
    vsl_alpha: float = 0.2
    value_weight: float = 0.5
    hepo_weight: float = 0.0
    """Weight of the HEPO term over each request's logged final beams (the sibling
    groups; the shown items for lists without beams); 0: off."""
    dc_weight: float = 0.0
    """Distribution Consistency weight (RSPOConfig.dc_weight): the generator's
    distribution over each list's items towards the ranker's expected value."""
    organic_weight: float = 1.0
    """Weight of the organic term (RSPOConfig.organic_weight): RSPO and a VSL anchor over
    each mixed feed's organic items, rewarded by likes and dwell; 0: off."""
    train_on: str = "all"
    """all (provisional + corrections + changed finals) or final (final lists only)."""
    replay_size: int = 4096
    replay_frac: float = 0.25
    holdout_every: int = 10
    """Every n-th request (by id hash) is held out for the promotion guard."""
    holdout_size: int = 512
    max_regression: float = 0.05
    guard_min_lists: int = 30
    """The guard refuses a regression only when at least this many held-out lists carry a
    reward (with fewer, one or two lists decide; the estimate is recorded, not enforced)."""
    trie_logprobs: bool = True
    """Train on the shown items' log-probs renormalized over the servable trie at each id
    level, as the server's beam search scores them (off: over the whole vocabulary)."""
    guard_estimate: GuardEstimateName = "snips"
    """The promotion guard's estimate: on the held-out lists with logging propensities,
    the off-policy snips (or dr) of each model's served slate, or holdout_value
    (value-weighted over the shown items), which the guard falls back to when no list has
    propensities or the log does not support a model compared (learner/guard.py)."""
    guard_beam_width: int = 32
    """Beam width at every id level of the slates the snips/dr guard scores."""
    snapshot_every_updates: int = 50
    snapshot_every_s: float = 10.0
    checkpoint_every_s: float = 5.0
    keep_snapshots: int = 5
    seed: int = 0
    dead_letter_group: str = "adloop-dead-letters"
    """Consumer group marking the ``ads`` offsets already dead-lettered (shared with the
    servers' followers, so each bad ads record gets one dead letter)."""
    threads: int = 0
    """torch threads (per rank); 0: torch's default."""
    metrics_port: int = 9302
    metrics_host: str = "127.0.0.1"
    world_size: int = 1
    """Data-parallel ranks (learner/distributed.py). Without ``--rank`` (and without
    torchrun's ``RANK``) this process launches the ranks itself, on this host."""
    rank: int | None = None
    """This process's rank in a group started by an external launcher (torchrun sets
    ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, which are read too)."""
    master_addr: str = "127.0.0.1"
    """Address of rank 0's rendezvous store (``MASTER_ADDR`` when set)."""
    master_port: int = 0
    """Port of the rendezvous store (``MASTER_PORT`` when set); 0: the launcher picks a
    free one."""
    dist_backend: str = "auto"
    """Gradient all-reduce backend: auto (nccl when every local rank has its own GPU,
    else gloo), gloo or nccl. Control messages always go over gloo."""
    dist_timeout_s: float = 120.0
    """Longest wait on any collective (a rank that is gone makes the others exit
    non-zero after at most this long; a dead peer's closed socket is usually noticed at
    once). Must exceed rank 0's export + guard time."""
    restart_on_refusal: bool = True
    """After the promotion guard refuses a candidate, train on from the best published
    version's weights (off: from the refused candidate's)."""
    abtest_alpha: float = Field(0.05, gt=0, lt=1)
    """Level of the live A/B test (docs/abtest.md): the chance that it ever finds a
    difference between online and control when there is none, however long it runs."""
    abtest_min_requests: int = Field(1000, ge=2)
    """Final requests each bucket needs in a test epoch before the test may decide."""
    abtest_target_requests: int = Field(20_000, ge=1)
    """Requests per bucket at which the test's interval is tightest (its mixture scale)."""
    abtest_resume_requests: int = Field(5000, ge=2)
    """After a rollback, requests per bucket the restored version serves without being
    found worse before new versions are promoted again."""
    abtest_rollback: bool = True
    """Act on an online_worse decision: stop promoting, roll the servers back, train on
    from the restored version (off: log, count and alert only)."""


_F32_MAX = 3.4e38


def check_trainable(fb: Feedback) -> None:
    """Raise ``ValueError`` for a list the learner must not train on: a number that is
    not finite in float32 (it would turn the loss, then the weights, into NaN)."""
    for name, v in (("event_time", fb.event_time), ("impression_time", fb.impression_time),
                    ("elapsed_s", fb.elapsed_s)):
        if not math.isfinite(v):
            raise ValueError(f"{name} is {v}")
    for i, it in enumerate(fb.items):
        for name, v in (("reward", it.reward), ("conversion_value", it.conversion_value),
                        ("score", it.score), ("bid", it.bid)):
            if not abs(v) < _F32_MAX:
                raise ValueError(f"items[{i}].{name} is {v}, not a finite float32")
    for i, c in enumerate(fb.beams):
        for name, v in (("logprob", c.logprob), ("expected_value", c.expected_value),
                        ("bid", c.bid)):
            if not abs(v) < _F32_MAX:
                raise ValueError(f"beams[{i}].{name} is {v}, not a finite float32")


def no_preference(fb: Feedback) -> str | None:
    """Why ``fb`` states no preference between its items (RSPO's loss on it is 0):
    ``one_item``, ``equal_rewards``, or None when it ranks something above something."""
    if len(fb.items) <= 1:
        return "one_item"
    first = round(fb.items[0].reward, 9)
    if all(round(it.reward, 9) == first for it in fb.items[1:]):
        return "equal_rewards"
    return None


class LedgerError(RuntimeError):
    """The ledger and the checkpoint disagree (offsets went backwards)."""


class LearnerService:
    """The stream loop around :class:`OnlineLearner` (see the module docstring)."""

    rank = 0
    """Data-parallel rank (:class:`learner.distributed.RankService` sets it): only rank 0
    writes the state directory, reads ``ads`` for new ids and publishes."""

    def __init__(self, s: LearnerSettings) -> None:
        self.s = s
        if s.threads:
            torch.set_num_threads(s.threads)
        self.kafka = KafkaSettings(bootstrap_servers=s.bootstrap_servers,
                                   topic_prefix=s.topic_prefix, client_id="adloop-learner")
        self.topics = Topics(s.topic_prefix)
        self.state_dir = Path(s.state_dir)
        (self.state_dir / "ledger").mkdir(parents=True, exist_ok=True)
        self.store = SnapshotStore(s.snapshot_store, s.snapshot_base_url)
        keyring = load_keyring(s.update_keys, s.update_keys_file, default_keyring_file())
        self.publisher = Publisher(self.store, self.state_dir / "staging", s.model_name,
                                   s.max_regression, s.keep_snapshots,
                                   signer=UpdateSigner.of(keyring, s.update_key_id))
        self.producer = EventProducer(self.kafka)
        self.rng = random.Random(s.seed)
        self.rspo_cfg = RSPOConfig(beta=s.beta, vsl_alpha=s.vsl_alpha, hepo_weight=s.hepo_weight,
                                   dc_weight=s.dc_weight, organic_weight=s.organic_weight)
        self._init_abtest()
        # state restored from / saved to the checkpoint
        self.seq = 0
        self.positions: dict[int, int] = {}
        self.next_version = 1
        self.ads_checked = 0
        """Offsets of ``ads`` below this were dead-lettered (if bad) before the checkpoint."""
        self.organic_checked = 0
        """The same mark for ``organic-items``."""
        self.last_published: str | None = None
        self.pending_update: str | None = None
        self.watermark = 0.0
        self.newest_append_ms = 0
        self.seen: OrderedDict[str, tuple[float, list[float]]] = OrderedDict()
        self.ledger: list[dict[str, Any]] = []
        self.pending: list[tuple[Feedback, float]] = []
        self.no_preference: Counter[str] = Counter()
        """Lists of ``pending`` that state no preference, by reason (logged per update)."""
        self.pending_since = 0.0
        self.replay: deque[tuple[Feedback, float]] = deque(maxlen=max(1, s.replay_size))
        self.ads: dict[str, Ad] = {}
        self.ads_generation = 0
        """Bumped whenever an ``ads`` record is applied (the servable trie's cache key)."""
        self._trie: tuple[tuple[int, int], IdTrie | None] | None = None
        """The latest ``ads`` record of each ad (bids and status for the guard's slates)."""
        self.guard = GuardEstimate(s.guard_estimate, s.guard_beam_width)
        self.holdout: deque[tuple[Feedback, float]] = deque(maxlen=max(1, s.holdout_size))
        self.updates_since_publish = 0
        self.last_publish = time.monotonic()
        self.last_checkpoint = time.monotonic()
        self.ready = False
        self.model, self.tok, self.learner = self._load()
        self.baseline = OnlineLearner.frozen_copy(self.model)
        """The model this process started from: the promotion guard's floor."""
        self.best: GenerativeRecommender | None = None
        """The best version published by this process (by the guard's estimate)."""
        self.consumer = EventConsumer(self.kafka, ["feedback"], s.group_id, dlq=self.producer,
                                      subscribe=False, max_poll_records=s.batch_lists)
        self.ads_consumer = KafkaConsumer(**self.kafka.client_config(),
                                          enable_auto_commit=False,
                                          isolation_level="read_committed")
        self.ads_dead = DeadLetterOnce(self.kafka, s.dead_letter_group)

    def _init_abtest(self) -> None:
        """The live A/B test's state and the published versions' bookkeeping."""
        self.monitor = BucketMonitor(self.s.abtest_alpha, self.s.abtest_min_requests,
                                     self.s.abtest_target_requests)
        self.ab_pending: TestResult | None = None
        self.rollback_not_before = 0.0
        """Monotonic time before which a failed rollback is not tried again."""
        """An online_worse decision not acted on yet (the next loop step rolls back)."""
        self.ab_hold: dict[str, Any] | None = None
        """Why promotion is held (set by an online_worse decision), or None."""
        self.ab_failed: set[str] = set()
        """Versions found worse (the online one at each online_worse decision)."""
        self.republished: dict[str, str] = {}
        """Rollback version -> the version whose snapshot it re-announced."""
        self.weights: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        """Weights of recently published versions (a rollback trains on from them)."""
        self.best_version: str | None = None
        self.serving_since = 0.0
        self.refused_in_a_row = 0

    # -- start-up ----------------------------------------------------------------------
    def _load(self) -> tuple[GenerativeRecommender, UASIDTokenizer, OnlineLearner]:
        path = self.state_dir / STATE_FILE
        if path.exists():
            st = torch.load(path, map_location="cpu", weights_only=True)
            if st.get("format") != STATE_FORMAT:
                raise LedgerError(f"{path}: state format {st.get('format')} not readable")
            tok = UASIDTokenizer.load(self.state_dir / st["tokenizer_dir"])
            tok.check_version(st["id_space_version"], what=f"learner state {path}")
            model = GenerativeRecommender(ModelConfig.from_json(st["config"]))
            model.load_state_dict(st["model"])
            learner = self._learner(model)
            load_optimizer_state(learner.opt, st["optimizer"], path)
            learner.ref.load_state_dict(st["reference"])
            learner.steps = int(st["steps"])
            self.seq = int(st["seq"])
            self.positions = {int(k): int(v) for k, v in st["positions"].items()}
            self.next_version = int(st["next_version"])
            self.ads_checked = int(st.get("ads_checked", 0))
            self.organic_checked = int(st.get("organic_checked", 0))
            self.last_published = st["last_published"]
            self.pending_update = st["pending_update"]
            self.watermark = float(st["watermark"])
            self.seen = OrderedDict((k, (float(v[0]), list(v[1]))) for k, v in st["seen"])
            if st.get("abtest"):
                self.load_abtest(st["abtest"])
            if self.rank == 0:
                for seg in (self.state_dir / "ledger").glob("*.jsonl"):
                    if int(seg.stem) > self.seq:   # trained after the checkpoint: redo
                        seg.unlink()
            log.info("learner.resumed", seq=self.seq, positions=self.positions,
                     next_version=self.next_version)
            return model, tok, learner
        init = Path(self.s.init_run_dir)
        if not (init / "checkpoint.pt").exists():
            raise SystemExit(f"adloop learn: no learner state in {self.state_dir} and no "
                             f"pretrained model in {init}; run `adloop pretrain` first "
                             "(or pass --init-run-dir)")
        model, tok, _ = load_model(init)
        log.info("learner.initialised", from_run=str(init), params=model.num_parameters())
        return model, tok, self._learner(model)

    def _learner(self, model: GenerativeRecommender) -> OnlineLearner:
        return OnlineLearner(model, self.rspo_cfg, lr=self.s.lr, value_weight=self.s.value_weight)

    def my_partitions(self, parts: list[int]) -> list[int]:
        """The ``feedback`` partitions this process trains on (all of them)."""
        return parts

    def start(self) -> None:
        feedback = self.topics.feedback
        deadline = time.monotonic() + self.kafka.topic_wait_s
        parts: list[int] = []
        while not parts and time.monotonic() < deadline:
            parts = sorted(self.consumer.consumer.partitions_for_topic(feedback) or ())
            if not parts:
                time.sleep(0.2)
        if not parts:
            raise SystemExit(f"adloop learn: topic {feedback} does not exist after "
                             f"{self.kafka.topic_wait_s:.0f}s (run `adloop topics create`)")
        tps = [TopicPartition(feedback, p) for p in self.my_partitions(parts)]
        self.consumer.consumer.assign(tps)
        for tp in tps:
            if tp.partition in self.positions:
                self.consumer.consumer.seek(tp, self.positions[tp.partition])
            else:
                self.consumer.consumer.seek_to_beginning(tp)
        catalogue = self.catalogue_partitions()
        self.ads_consumer.assign(catalogue)
        self.ads_consumer.seek_to_beginning(*catalogue)
        self.poll_ads(timeout_ms=2000, until_end=True)
        if self.pending_update is not None:          # announced? make sure it is
            self.publisher.announce(self.producer, decode(self.pending_update.encode(),
                                                          ModelUpdate))  # type: ignore[arg-type]
            self.pending_update = None
        if self.last_published is None:
            self.publish()
        self.ready = True

    # -- the catalogue: ads and organic items -------------------------------------------
    def catalogue_partitions(self) -> list[TopicPartition]:
        """``ads`` and, when the topic exists, ``organic-items`` (both one partition)."""
        tps = [TopicPartition(self.topics.ads, 0)]
        organic = self.topics.name("organic-items")
        if self.ads_consumer.partitions_for_topic(organic):
            tps.append(TopicPartition(organic, 0))
        else:
            log.warning("learner.no_organic_items_topic", topic=organic,
                        effect="organic items get no ids online")
        return tps

    def poll_ads(self, timeout_ms: int = 0, until_end: bool = False) -> None:
        """Read new ``ads`` and ``organic-items`` records and give new ads and organic
        items ids. A record that does not decode, or an item the tokenizer cannot place
        (missing attributes, id space full, ...), is dead-lettered (``handler_error`` for
        the latter) once per offset, and skipped."""
        tps = list(self.ads_consumer.assignment())
        ends = self.ads_consumer.end_offsets(tps) if until_end else {}
        organic_topic = self.topics.name("organic-items")
        while True:
            new: list[tuple[Ad, Any]] = []
            for tp, msgs in self.ads_consumer.poll(timeout_ms=timeout_ms).items():
                if tp.topic == organic_topic:
                    self._place_organic(msgs)
                    continue
                for m in msgs:
                    ad = decode(m.value, Ad)
                    if isinstance(ad, DecodeFailure):
                        self._catalogue_dead_letter("ads", m, ad.reason, ad.detail)
                        continue
                    self.ads[ad.ad_id] = ad
                    self.ads_generation += 1
                    if ad.ad_id not in self.tok:
                        new.append((ad, m))
            self._place("ads", [(ad.ad_id, ad, m) for ad, m in new], self.tok.add_ads,
                        lambda ad_id: ad_id in self.tok, NEW_ADS)
            if not until_end or all(self.ads_consumer.position(tp) >= end
                                    for tp, end in ends.items()):
                return

    def _place_organic(self, msgs: list[Any]) -> None:
        """Give ids to the organic items of new ``organic-items`` records."""
        new: list[tuple[OrganicItem, Any]] = []
        known = self.tok.organic_table()
        for m in msgs:
            item = decode(m.value, OrganicItem)
            if isinstance(item, DecodeFailure):
                self._catalogue_dead_letter("organic-items", m, item.reason, item.detail)
                continue
            if item.status == "active" and item.item_id not in known:
                new.append((item, m))
        self._place("organic-items", [(item.item_id, item, m) for item, m in new],
                    self.tok.add_organic,
                    lambda item_id: item_id in self.tok.organic_table(), NEW_ORGANIC)

    def _place(self, topic: str, new: Sequence[tuple[str, Any, Any]],
               add: Callable[[list[Any]], object], placed: Callable[[str], bool],
               counter: Any) -> None:
        """Give the ``(id, record, message)`` triples of ``topic`` ids with ``add`` in one
        batch, then one by one when the batch fails, so one bad item does not block the
        rest (``placed(id)``: it has one already); one the tokenizer cannot place is
        dead-lettered (``handler_error``) once per offset."""
        if not new:
            return
        noun = "ad" if topic == "ads" else "organic item"
        try:
            add([rec for _, rec, _ in new])
            counter.inc(len(new))
        except Exception as exc:
            log.warning("learner.catalogue_batch_partial", topic=topic,
                        error=repr(exc)[:300])
            for item_id, rec, m in new:
                if placed(item_id):
                    continue
                try:
                    add([rec])
                    counter.inc()
                except Exception as one:
                    log.warning("learner.catalogue_item_rejected", topic=topic,
                                item_id=item_id, error=str(one))
                    self._catalogue_dead_letter(topic, m, "handler_error",
                                                f"tokenizer cannot place {noun}: {one!r}")

    def _catalogue_dead_letter(self, topic: str, m: Any, reason: DlqReason,
                               detail: str) -> None:
        # the catalogue reader has no consumer group: offsets below the checked mark were
        # handled before the checkpoint, and DeadLetterOnce's mark (shared with the
        # servers) keeps each offset to one dead letter across restarts and readers
        checked = self.ads_checked if topic == "ads" else self.organic_checked
        if m.offset >= checked:
            self.ads_dead.offer(topic, m.partition, m.offset, reason, detail,
                                m.value or b"", m.key)

    # -- feedback ------------------------------------------------------------------------
    def _is_holdout(self, request_id: str) -> bool:
        if self.s.holdout_every <= 0:
            return False
        return zlib.crc32(request_id.encode()) % self.s.holdout_every == 0

    def classify(self, fb: Feedback) -> tuple[float | None, str]:
        """The list weight to train ``fb`` with, or None and the reason it is skipped."""
        rewards = [round(it.reward, 9) for it in fb.items]
        if self._is_holdout(fb.request_id):
            if fb.kind == "final":
                self.holdout.append((fb, 1.0))
            return None, "holdout"
        prev = self.seen.get(fb.request_id)
        if self.s.train_on == "final" and fb.kind != "final":
            return None, "not_final"
        if fb.kind == "provisional":
            w = provisional_weight(fb)
        elif prev is not None and prev[1] == rewards:
            return None, "unchanged"
        else:
            w = 1.0 - prev[0] if prev is not None else 1.0
            w = max(w, 0.05)
        self.seen[fb.request_id] = (1.0 if fb.kind != "provisional" else w, rewards)
        self.seen.move_to_end(fb.request_id)
        while len(self.seen) > 200_000:
            self.seen.popitem(last=False)
        if fb.kind == "final":
            self.seen.pop(fb.request_id, None)  # nothing follows a final
        return w, "trained"

    def handle(self, batch: list[Received[Any]]) -> None:
        if batch and not self.pending:
            self.pending_since = time.monotonic()
        for rec in batch:
            fb: Feedback = rec.record
            try:
                check_trainable(fb)
                if self.rank == 0:
                    self.monitor.observe(fb)
                w, outcome = self.classify(fb)
            except Exception as exc:  # decodes, but cannot be trained on: never retried
                w, outcome = None, "handler_error"
                self.consumer.send_dead_letter("feedback", rec.partition, rec.offset,
                                               "handler_error", f"not trainable: {exc}",
                                               encode(fb), rec.key)
            self.ledger.append({"p": rec.partition, "o": rec.offset, "request_id": fb.request_id,
                                "revision": fb.revision, "kind": fb.kind, "outcome": outcome})
            LISTS.labels(outcome).inc()
            if w is not None:
                why = no_preference(fb)
                if why is not None:
                    NO_PREFERENCE.labels(why).inc()
                    self.no_preference[why] += 1
                self.pending.append((fb, w))
                self.watermark = max(self.watermark, fb.event_time)
                self.newest_append_ms = max(self.newest_append_ms, rec.timestamp_ms)
        if batch and self.rank == 0:
            self.check_abtest()

    def train_pending(self) -> dict[str, float] | None:
        if not self.pending:
            return None
        lists = list(self.pending)
        n_replay = int(len(lists) * self.s.replay_frac)
        if n_replay and self.replay:
            lists += self.rng.sample(list(self.replay), min(n_replay, len(self.replay)))
            REPLAYED.inc(len(lists) - len(self.pending))
        self.replay.extend(self.pending)
        self.pending = []
        if self.no_preference:
            log.info("learner.no_preference", of=len(lists), **dict(self.no_preference))
            self.no_preference.clear()
        t0 = time.perf_counter()
        metrics = self.update_model(lists)
        UPDATE_SECONDS.observe(time.perf_counter() - t0)
        UPDATES.inc()
        self.updates_since_publish += 1
        for term in ("loss", "rspo", "vsl", "value", "hepo", "dc"):
            LOSS.labels(term).set(metrics[term])
        REWARD.set(metrics["mean_reward"])
        KL.set(metrics["kl_ref"])
        WATERMARK.set(self.watermark)
        return metrics

    def update_model(self, lists: list[tuple[Feedback, float]]) -> dict[str, float]:
        """One optimizer step on ``lists`` (after filling the value head's topic match
        for the ads and organic topics that arrived since the last one)."""
        fill_topic_match(self.model, self.tok, [fb for fb, _ in lists], self.ads.values())
        return self.learner.update(lists_to_batch(lists, self.tok, self.model,
                                                  self.learner_trie(),
                                                  beams=self.learner.reads_beams,
                                                  organic_dwell_s=self.learner.organic_dwell_s))

    def learner_trie(self) -> IdTrie | None:
        """The servable ids the tokenizer knows, as a trie (None with ``trie_logprobs``
        off or before any ad is servable); rebuilt when an ad record or an id changes."""
        if not self.s.trie_logprobs:
            return None
        key = (self.ads_generation, len(self.tok))
        if self._trie is None or self._trie[0] != key:
            cat = Catalogue.of(self.ads, self.tok)
            self._trie = (key, cat.trie if cat is not None else None)
        return self._trie[1]

    # -- the live A/B test ------------------------------------------------------------------
    def check_abtest(self) -> None:
        """Act on a new decision of the test (rank 0, after each polled batch)."""
        res = self.monitor.new_decision()
        if res is None:
            if self.ab_hold is not None and self.ab_hold.get("restored") and \
                    self.ab_pending is None:
                self._maybe_resume()
            return
        evidence = self.monitor.evidence(res)
        if res.decision == "online_better":
            log.info("abtest.decision", **evidence, action="none")
            self.monitor.restart(self.monitor.accept)
            return
        if self.monitor.current_online is not None:
            self.ab_failed.add(self.monitor.current_online)
            self.ab_failed.add(self.republished.get(self.monitor.current_online,
                                                    self.monitor.current_online))
        if not self.s.abtest_rollback:
            ROLLBACKS.labels("disabled").inc()
            log.warning("abtest.decision", **evidence, action="none (rollback disabled)")
            self.monitor.restart(self.monitor.accept)
            return
        self.ab_pending = res
        if self.ab_hold is None:
            self.ab_hold = {"since": time.time(), "decision": evidence}
        PROMOTION_HELD.set(1)
        log.warning("abtest.decision", **evidence,
                    action="promotion held; rollback at the next loop step")

    def rollback_due(self) -> bool:
        """An online_worse decision waits for its rollback (rank 0; a failed one only
        after ``--snapshot-every-s``)."""
        return self.ab_pending is not None and time.monotonic() >= self.rollback_not_before

    def _maybe_resume(self) -> None:
        assert self.ab_hold is not None
        res = self.monitor.result()
        if min(res.n_online, res.n_control) >= self.s.abtest_resume_requests \
                and res.decision != "online_worse":
            log.info("abtest.promotion_resumed", restored=self.ab_hold.get("restored"),
                     held_s=round(time.time() - self.ab_hold["since"], 1), **res.evidence())
            self.ab_hold = None
            PROMOTION_HELD.set(0)

    def rollback(self) -> dict[str, torch.Tensor] | None:
        """Re-announce the best earlier version that was not worse (``pending_update``);
        the weights to train on from, or None when nothing could be rolled back to."""
        assert self.ab_pending is not None
        decided, self.ab_pending = self.ab_pending, None
        stored = set(self.store.versions())
        exclude = self.ab_failed | {v for v, src in self.republished.items()
                                    if src in self.ab_failed}
        cands = self.monitor.rollback_candidates(exclude)
        considered = [c.describe() for c in cands[:5]]
        target = next((c for c in cands if c.version in stored), None)
        evidence = self.monitor.evidence(decided)
        if target is None:
            ROLLBACKS.labels("no_candidate").inc()
            log.error("abtest.rollback", result="no_candidate", candidates=considered,
                      stored=sorted(stored)[-10:], serving=self.last_published, **evidence,
                      effect="promotion stays held; the test restarts")
            self.monitor.restart(None)
            return None
        source = self.republished.get(target.version, target.version)
        version = f"v{self.next_version:06d}"
        try:
            pub = self.publisher.republish(target.version, self.tok, version, self.watermark,
                                           extra={"rollback": {"decision": evidence,
                                                               "target": target.describe()}})
        except SnapshotRefusedError as exc:
            ROLLBACKS.labels("failed").inc()
            log.error("abtest.rollback", result="failed", target=target.version,
                      error=str(exc)[:300], **evidence,
                      effect=f"retried in {self.s.snapshot_every_s:g}s")
            self.ab_pending = decided
            self.rollback_not_before = time.monotonic() + self.s.snapshot_every_s
            return None
        event = self.publisher.update_event(pub, self.watermark)
        self.next_version += 1
        weights = self.weights.get(target.version) or self.weights.get(source)
        restart = weights if weights is not None else self.baseline.state_dict()
        self.remember_weights(version, restart)
        self.republished[version] = source
        self.last_published = version
        self.pending_update = json.dumps(_builtins(event))
        self.best = None
        self.best_version = version
        self.monitor.restart({version})
        assert self.ab_hold is not None
        self.ab_hold["restored"] = version
        ROLLBACKS.labels("published").inc()
        log.warning("abtest.rollback", result="published", version=version,
                    restores=target.version, snapshot_of=source, target=target.describe(),
                    candidates=considered, trains_from=target.version if weights is not None
                    else "the starting model (weights of the target not held)", **evidence)
        return restart

    def abtest_state(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state(), "hold": self.ab_hold,
                "pending": self.ab_pending is not None, "failed": sorted(self.ab_failed),
                "republished": self.republished, "serving_since": self.serving_since,
                "refused_in_a_row": self.refused_in_a_row, "best_version": self.best_version}

    def load_abtest(self, st: dict[str, Any]) -> None:
        self.monitor.load(st["monitor"])
        self.ab_hold = st.get("hold")
        if st.get("pending"):
            self.ab_pending = self.monitor.test.decided
        self.ab_failed = set(st.get("failed", []))
        self.republished = dict(st.get("republished", {}))
        self.serving_since = float(st.get("serving_since", 0.0))
        self.refused_in_a_row = int(st.get("refused_in_a_row", 0))
        self.best_version = st.get("best_version")
        PROMOTION_HELD.set(1 if self.ab_hold is not None else 0)
        REFUSED_IN_A_ROW.set(self.refused_in_a_row)
        if self.serving_since:
            SERVING_SINCE.set(self.serving_since)

    def remember_weights(self, version: str, state: dict[str, torch.Tensor]) -> None:
        """Keep ``version``'s weights (CPU copies) for a later rollback: the last
        ``keep_snapshots`` versions and those the store protects."""
        self.weights[version] = {k: v.detach().clone() for k, v in state.items()}
        keep = self.monitor.protected() | {self.best_version or ""}
        while len(self.weights) > max(1, self.s.keep_snapshots):
            old = next((v for v in self.weights if v not in keep and v != version), None)
            if old is None:
                break
            del self.weights[old]

    # -- snapshots -----------------------------------------------------------------------
    def publish(self) -> bool:
        """Export + guard + store the current model, checkpoint, then announce it; or,
        after an online_worse decision, roll back instead (see the module docstring)."""
        stored, restart = self.publish_outcome()
        return self.apply_publish_outcome(stored, restart)

    def publish_outcome(self) -> tuple[bool, dict[str, torch.Tensor] | None]:
        """Rank 0's part of a publish: (something to announce, weights to train on from)."""
        if self.ab_pending is not None:
            restart = self.rollback()
            return self.pending_update is not None, restart
        if self.ab_hold is not None:
            log.info("abtest.promotion_held", serving=self.last_published,
                     since=round(self.ab_hold["since"], 3),
                     restored=self.ab_hold.get("restored"))
            return False, None
        if self.store_snapshot():
            return True, None
        return False, self.restart_point()

    def apply_publish_outcome(self, stored: bool,
                              restart: dict[str, torch.Tensor] | None) -> bool:
        """Every rank: load ``restart`` into the model, then refresh π_ref and announce
        when something was stored."""
        if restart is not None:
            self.model.load_state_dict(restart)
        if not stored:
            self.updates_since_publish = 0
            self.last_publish = time.monotonic()
            return False
        self.learner.refresh_reference()
        self.finish_publish()
        return True

    def restart_point(self) -> dict[str, torch.Tensor] | None:
        """After a refusal: the best published version's weights (None: keep training the
        refused candidate, with ``restart_on_refusal`` off or nothing published yet)."""
        if not self.s.restart_on_refusal:
            return None
        if self.best is not None:
            return self.best.state_dict()
        if self.last_published is not None:
            return self.learner.ref.state_dict()
        return None

    def store_snapshot(self) -> bool:
        """Export + guard + store the current model (``pending_update`` is its
        announcement); False when the guard refused it."""
        version = f"v{self.next_version:06d}"
        rnd = self.guard.round(self.learner, [fb for fb, _ in self.holdout], self.tok,
                               self.ads, self.learner_trie())
        refs: dict[str, float] = {}
        valued = sum(1 for fb, _ in self.holdout if any(it.reward > 0 for it in fb.items))
        if rnd is not None and valued < self.s.guard_min_lists:
            log.info("guard.not_enforced", version=version, held_out_lists_with_reward=valued,
                     needed=self.s.guard_min_lists)
        elif rnd is not None:
            self.guard.settle(rnd, [self.baseline, self.best, self.model,
                                    self.learner.ref if self.last_published is not None
                                    else None])
            refs["baseline"] = rnd.value(self.baseline)
            if self.best is not None:
                refs["best"] = rnd.value(self.best)
            if self.last_published is not None:
                refs["serving"], serving_ndcg = rnd.metrics(self.learner.ref)
                HOLDOUT.labels("serving").set(serving_ndcg)
            for name, v in refs.items():
                self._guard_gauges(name, rnd.name, v)
        cand_value = math.nan

        def holdout(m: GenerativeRecommender) -> float:
            nonlocal cand_value
            if rnd is None:
                return math.nan
            cand_value, cand_ndcg = rnd.metrics(m)
            HOLDOUT.labels("candidate").set(cand_ndcg)
            self._guard_gauges("candidate", rnd.name, cand_value)
            return cand_value

        try:
            pub = self.publisher.publish(
                self.model, self.tok, version, self.last_published, self.watermark,
                holdout=holdout, references=refs,
                metrics={"updates": float(self.learner.steps)},
                estimate=rnd.name if rnd is not None else "holdout_value")
        except SnapshotRefusedError as exc:
            self.next_version += 1  # the refused name is never reused
            self.updates_since_publish = 0
            self.last_publish = time.monotonic()
            self.version_kept(version, exc.reason)
            return False
        event = self.publisher.update_event(pub, self.watermark)
        self.next_version += 1
        self.last_published = version
        if math.isfinite(cand_value) and cand_value >= refs.get("best", -math.inf):
            self.best = OnlineLearner.frozen_copy(self.model)
            self.best_version = version
        self.remember_weights(version, self.model.state_dict())
        self.refused_in_a_row = 0
        REFUSED_IN_A_ROW.set(0)
        self.pending_update = json.dumps(_builtins(event))
        return True

    def version_kept(self, refused: str, reason: str) -> None:
        """A refused candidate: say which version keeps serving, since when, and what
        training goes on from."""
        self.refused_in_a_row += 1
        REFUSED_IN_A_ROW.set(self.refused_in_a_row)
        if self.s.restart_on_refusal and self.best is not None:
            trains_from = f"{self.best_version} (best published)"
        elif self.s.restart_on_refusal and self.last_published is not None:
            trains_from = f"{self.last_published} (serving)"
        else:
            trains_from = f"{refused} (the refused candidate)"
        log.warning("learner.version_kept", serving=self.last_published,
                    serving_since=round(self.serving_since, 3) if self.serving_since else None,
                    serving_for_s=round(time.time() - self.serving_since, 1)
                    if self.serving_since else None,
                    refused=refused, reason=reason, refused_in_a_row=self.refused_in_a_row,
                    trains_from=trains_from)

    @staticmethod
    def _guard_gauges(model: str, estimate: str, value: float) -> None:
        GUARD_VALUE.labels(model, estimate).set(value)
        if estimate == "holdout_value":
            HOLDOUT_VALUE.labels(model).set(value)

    def finish_publish(self) -> None:
        """Checkpoint (durable before announcing), then announce ``pending_update``.

        Retried by :meth:`step` until it goes through when Kafka is unreachable."""
        assert self.pending_update is not None
        self.commit()
        self.announce()
        self.updates_since_publish = 0
        self.last_publish = time.monotonic()

    def announce(self) -> None:
        """Send ``pending_update`` to ``model-updates`` (it is checkpointed already)."""
        assert self.pending_update is not None
        event = decode(self.pending_update.encode(), ModelUpdate)
        assert isinstance(event, ModelUpdate)
        self.publisher.protect = self.monitor.protected() | set(self.weights)
        self.publisher.announce(self.producer, event)
        self.monitor.announced(event.version)
        self.pending_update = None
        now = time.time()
        self.serving_since = now
        SERVING_SINCE.set(now)
        PUBLISH_TS.set(now)
        MODEL_VERSION.set(self.next_version - 1)
        if self.newest_append_ms:
            FRESHNESS.observe(max(0.0, now - self.newest_append_ms / 1000.0))

    # -- the commit path -----------------------------------------------------------------
    def commit(self) -> None:
        """Make the effect of everything consumed so far durable (see module docstring)."""
        if self.pending:
            raise LedgerError("commit with untrained pending lists would skip them")
        # 1. dead letters durable
        self.producer.flush(30)
        positions = self.consumer_positions()
        ads_checked = self.write_state(self.seq + 1, positions, self.ledger,
                                       list(self.seen.items()))
        self.committed(self.seq + 1, positions, ads_checked)

    def consumer_positions(self) -> dict[int, int]:
        """The consumer's position in each assigned ``feedback`` partition (never behind
        the checkpoint's)."""
        positions = {tp.partition: self.consumer.consumer.position(tp)
                     for tp in self.consumer.consumer.assignment()}
        for p, off in positions.items():
            if off < self.positions.get(p, 0):
                raise LedgerError(f"partition {p}: position {off} is behind the checkpoint's "
                                  f"{self.positions[p]} (offsets only increase)")
        return positions

    def write_state(self, seq: int, positions: dict[int, int], ledger: list[dict[str, Any]],
                    seen: list[tuple[str, tuple[float, list[float]]]]) -> int:
        """Steps 2 and 3 of the commit path: the ledger segment, then the checkpoint
        (atomically). Returns how far ``ads`` has been checked."""
        ads_tp = TopicPartition(self.topics.ads, 0)
        ads_checked = max(self.ads_checked, self.ads_consumer.position(ads_tp))
        organic_tp = TopicPartition(self.topics.name("organic-items"), 0)
        organic_checked = (max(self.organic_checked, self.ads_consumer.position(organic_tp))
                           if organic_tp in self.ads_consumer.assignment()
                           else self.organic_checked)
        # 2. ledger segment for this checkpoint
        if ledger:
            seg = self.state_dir / "ledger" / f"{seq:08d}.jsonl"
            tmp = seg.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in ledger))
            os.replace(tmp, seg)
        # 3. checkpoint (tokenizer first, in a directory named for this checkpoint)
        tok_dir = f"{TOKENIZER_DIR}.{seq:08d}"
        self.tok.save(self.state_dir / tok_dir)
        state = {
            "format": STATE_FORMAT, "seq": seq, "config": self.model.cfg.to_json(),
            "model": self.model.state_dict(), "optimizer": self.learner.opt.state_dict(),
            "reference": self.learner.ref.state_dict(), "steps": self.learner.steps,
            "tokenizer_dir": tok_dir, "id_space_version": self.tok.id_space_version,
            "positions": {str(p): o for p, o in positions.items()},
            "next_version": self.next_version, "last_published": self.last_published,
            "ads_checked": ads_checked, "organic_checked": organic_checked,
            "pending_update": self.pending_update, "watermark": self.watermark,
            "seen": [[k, [v[0], v[1]]] for k, v in seen],
            "abtest": self.abtest_state(),
        }
        tmp_state = self.state_dir / (STATE_FILE + ".tmp")
        with open(tmp_state, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_state, self.state_dir / STATE_FILE)
        self.organic_checked = organic_checked
        for old in self.state_dir.glob(f"{TOKENIZER_DIR}.*"):
            if old.name != tok_dir:
                shutil.rmtree(old, ignore_errors=True)
        return ads_checked

    def committed(self, seq: int, positions: dict[int, int], ads_checked: int) -> None:
        """After checkpoint ``seq`` is durable: forget its ledger, step 4 (mirror)."""
        self.seq, self.ledger = seq, []
        self.positions.update(positions)
        self.ads_checked = ads_checked
        # 4. mirror to Kafka (informational; the checkpoint is the truth)
        try:
            self.consumer.commit({tp: positions[tp.partition]
                                  for tp in self.consumer.consumer.assignment()})
        except Exception as exc:  # a mirror failure must not stop training
            log.warning("learner.offset_mirror_failed", error=repr(exc))
        self.last_checkpoint = time.monotonic()

    # -- the loop ------------------------------------------------------------------------
    def step(self, poll_timeout_ms: int = 200) -> None:
        if self.pending_update is not None:   # a publish that Kafka interrupted
            self.finish_publish()
        room = max(1, self.s.batch_lists - len(self.pending))
        self.handle(self.consumer.poll(poll_timeout_ms, max_records=room))
        self.poll_ads()
        if self.rollback_due():     # online_worse: roll back now, not at a publish
            if self.pending:        # a publish commits: what was read is trained first
                self.train_pending()
            self.publish()
            return
        full = len(self.pending) >= self.s.batch_lists
        waited = self.pending and time.monotonic() - self.pending_since >= self.s.max_wait_s
        if full or waited:
            self.train_pending()
        if self.pending:
            return
        due = (self.updates_since_publish >= self.s.snapshot_every_updates or (
            self.updates_since_publish > 0
            and time.monotonic() - self.last_publish >= self.s.snapshot_every_s))
        if due:
            self.publish()
        elif time.monotonic() - self.last_checkpoint >= self.s.checkpoint_every_s and (
                self.ledger or self.updates_since_publish):
            self.commit()

    def run(self, stop: threading.Event) -> None:
        self.start()
        backoff = 0.5
        while not stop.is_set():
            try:
                self.step()
                backoff = 0.5
            except KafkaError as exc:   # broker unreachable: keep state, retry the step
                KAFKA_ERRORS.inc()
                log.warning("learner.kafka_unavailable", error=repr(exc)[:300],
                            retry_in_s=backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self.train_pending()
        if self.pending_update is not None:
            self.finish_publish()
        else:
            self.commit()

    def close(self) -> None:
        self.consumer.close()
        self.ads_consumer.close(autocommit=False)
        self.ads_dead.close()
        self.producer.close()


def _builtins(event: ModelUpdate) -> Any:
    import msgspec

    return msgspec.to_builtins(event)


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, LearnerSettings)


def run(args: argparse.Namespace) -> int:
    s = settings_from_args(LearnerSettings, args)
    if s.world_size > 1 or s.rank is not None or os.environ.get("WORLD_SIZE"):
        from learner import distributed

        s = distributed.resolve(s)
        if s.world_size > 1:
            return distributed.launch(s) if s.rank is None else distributed.run_rank(s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service = LearnerService(s)
    metrics = start_metrics_server(s.metrics_port, s.metrics_host, lambda: (
        service.ready, {"last_published": service.last_published}))
    log.info("learner.metrics", url=metrics.url)
    try:
        service.run(stop)
    finally:
        service.close()
        metrics.stop()
    return 0
