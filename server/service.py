"""The serving worker's parts wired together, started and stopped as one.

Reads: ``model-updates`` (and the snapshot store it points to), ``ads``,
``organic-items``.
Writes: ``impressions``. Threads: one follower per topic, the impression producer,
the model-execution worker(s); the batcher runs on the HTTP event loop.
"""

from __future__ import annotations

import time
from typing import Any

from server.batcher import Batcher
from server.catalog import AdCatalog, OrganicCatalog
from server.controller import BeamController
from server.engine import Engine
from server.explore import Explorer
from server.follow import TopicFollower
from server.impressions import ImpressionLogger
from server.models import ModelManager
from server.runtime import resolve_provider
from server.settings import ServerSettings
from server.trust import SnapshotBases, UpdateGate
from streams.kafka_io import DeadLetterOnce
from streams.logs import get_logger
from streams.schemas import Ad, DlqReason, ModelUpdate, OrganicItem
from streams.settings import KafkaSettings
from streams.signing import default_keyring_file, load_keyring

log = get_logger(__name__)


class Service:
    def __init__(self, settings: ServerSettings, kafka: KafkaSettings) -> None:
        self.settings = settings
        self.kafka = kafka
        self.provider = resolve_provider(settings.provider, settings.cuda_device_id)
        self.catalog = AdCatalog()
        self.organic = OrganicCatalog()
        schedule = settings.schedule()
        self.controller = BeamController(
            schedule, settings.slo_ms / 1000.0, settings.alpha_min, settings.min_beam_width,
            settings.dynamic_beams, settings.max_batch_size, settings.max_queue)
        self.models = ModelManager(self.catalog, self.provider, settings.cache_dir,
                                   settings.keep_versions, settings.intra_op_threads,
                                   settings.cuda_device_id, warmup_widths=schedule,
                                   swap_guard=self.controller.swapping, organic=self.organic)
        self.explorer = Explorer(settings.explore, settings.explore_max_shown, self.catalog,
                                 seed=settings.explore_seed)
        self.engine = Engine(self.models, self.catalog, self.explorer,
                             settings.log_beams if settings.log_impressions else 0,
                             settings.organic_beam, self.controller.organic_width,
                             settings.score_catalogue_max)
        self.batcher = Batcher(self.engine.run, self.controller, settings.max_batch_size,
                               settings.max_wait_ms / 1000.0, settings.workers)
        self.impressions = (ImpressionLogger(kafka, settings.impression_buffer,
                                            spool_dir=settings.spool_dir())
                            if settings.log_impressions else None)
        # bad records of the compacted topics: dead-lettered once per offset by whichever
        # reader (a replica, or the learner for ads) meets them first
        dead = settings.dead_letter_group
        self.gate = self._update_gate() if settings.follow_model_updates else None
        self.ads_follower = TopicFollower(
            kafka, "ads", self._on_ads,
            dead_letters=DeadLetterOnce(kafka, dead) if dead else None)
        self.organic_follower = TopicFollower(
            kafka, "organic-items", self._on_organic,
            dead_letters=DeadLetterOnce(kafka, dead) if dead else None)
        self.updates_follower = (TopicFollower(
            kafka, "model-updates", self._on_updates, on_caught_up=self._updates_caught_up,
            dead_letters=DeadLetterOnce(kafka, dead) if dead else None,
            tombstones=False,  # the learner never deletes an announcement: not ours
            check=self._check_update)  # signature and snapshot bases, before any fetch
            if settings.follow_model_updates else None)
        self._initial_updates: list[ModelUpdate] = []
        self._updates_initial_done = False
        self.started_at = time.time()

    def _update_gate(self) -> UpdateGate:
        """The keyring and snapshot bases (a bad setting stops the start, named)."""
        s = self.settings
        keyring = load_keyring(s.update_keys, s.update_keys_file, default_keyring_file())
        bases = SnapshotBases.parse(s.snapshot_bases)
        log.info("model_updates.trust", key_ids=keyring.ids, keyring=keyring.source,
                 snapshot_bases=bases.describe())
        return UpdateGate(keyring, bases)

    def _check_update(self, rec: Any) -> tuple[DlqReason, str] | None:
        assert self.gate is not None
        return self.gate.check(rec) if isinstance(rec, ModelUpdate) else None

    # -- lifecycle -------------------------------------------------------------------
    def start_threads(self) -> None:
        if self.impressions is not None:
            self.impressions.start()
        self.ads_follower.start()
        self.organic_follower.start()
        if self.settings.snapshot is not None:
            result = self.models.load_directory(self.settings.snapshot)
            if result != "ok":
                log.error("snapshot.refused", path=str(self.settings.snapshot), result=result)
        if self.updates_follower is not None:
            self.updates_follower.start()

    def stop_threads(self) -> None:
        for f in (self.updates_follower, self.organic_follower, self.ads_follower):
            if f is not None:
                f.stop()
        if self.impressions is not None:
            self.impressions.stop()

    # -- followers -------------------------------------------------------------------
    def _on_ads(self, batch: list[tuple[bytes | None, Any]]) -> None:
        updates: list[tuple[str, Ad | None]] = []
        for key, rec in batch:
            if rec is None:
                if key:
                    updates.append((key.decode("utf-8", "replace"), None))
            else:
                updates.append((rec.ad_id, rec))
        if self.catalog.apply(updates):
            self.models.on_catalog_change()

    def _on_organic(self, batch: list[tuple[bytes | None, Any]]) -> None:
        updates: list[tuple[str, OrganicItem | None]] = []
        for key, rec in batch:
            if rec is None:
                if key:
                    updates.append((key.decode("utf-8", "replace"), None))
            else:
                updates.append((rec.item_id, rec))
        if self.organic.apply(updates):
            self.models.on_organic_change()

    def _on_updates(self, batch: list[tuple[bytes | None, Any]]) -> None:
        for _key, rec in batch:
            if not isinstance(rec, ModelUpdate) or rec.model_name != self.settings.model_name:
                continue
            if self._updates_initial_done:
                self.models.apply_update(rec)
            else:
                self._initial_updates.append(rec)

    def _updates_caught_up(self) -> None:
        pending, self._initial_updates = self._initial_updates, []
        self._updates_initial_done = True
        if pending:
            self.models.start_from(pending)

    # -- status ----------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        state = self.models.state
        waiting = []
        if state is None:
            waiting.append("a model snapshot")
        if not self.ads_follower.caught_up.is_set():
            waiting.append("the ads topic")
        if not self.organic_follower.caught_up.is_set():
            waiting.append("the organic-items topic")
        detail = {
            "model_version": state.model.version if state else None,
            "provider": self.provider.name, "device": self.provider.device,
            "provider_reason": self.provider.reason,
            "catalog_caught_up": self.ads_follower.caught_up.is_set(),
            "catalog_ads": len(self.catalog),
            "servable_ads": state.trie.n_ads if state else 0,
            "catalog_organic_items": len(self.organic),
            "servable_organic_items": state.organic_trie.n_ads
            if state and state.organic_trie else 0,
            "beam_scale": self.controller.alpha,
            "waiting_for": waiting,
        }
        return not waiting, detail
