"""The serving worker's parts wired together, started and stopped as one.

Reads: ``model-updates`` (and the snapshot store it points to), ``ads``,
``organic-items``.
Writes: ``impressions``. Threads: one follower per topic, the impression producer,
the model-execution worker(s); the batcher runs on the HTTP event loop.
With a control bucket (``control_share`` > 0) a second, pinned model serves the
control users (:mod:`server.abtest`).
"""

from __future__ import annotations

import time
from typing import Any

from server.abtest import PRETRAINED, BucketRouter, ControlModel, assign
from server.batcher import Batcher
from server.catalog import AdCatalog, OrganicCatalog
from server.controller import BeamController
from server.engine import Engine
from server.explore import Explorer
from server.exposure import ExposureCounter
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
        # what each user was shown, shared by both buckets' engines (server/exposure.py)
        self.exposure = (ExposureCounter(settings.exposure_users)
                         if settings.exposure_users else None)
        self.engine = Engine(self.models, self.catalog, self.explorer,
                             settings.log_beams if settings.log_impressions else 0,
                             settings.organic_beam, self.controller.organic_width,
                             settings.score_catalogue_max, self.exposure)
        # the live A/B test (server/abtest.py): a control bucket on a pinned model, with
        # the online bucket's load controller, exploration and catalogues
        self.control: ControlModel | None = None
        control_engine: Engine | None = None
        if settings.control_share > 0:
            self.control = ControlModel(
                settings.control_version, self.models, self.catalog, self.organic,
                settings.cache_dir / "control-model",
                ModelManager(self.catalog, self.provider, settings.cache_dir / "control-model",
                             1, settings.intra_op_threads, settings.cuda_device_id,
                             warmup_widths=schedule, swap_guard=self.controller.swapping,
                             organic=self.organic))
            control_engine = Engine(self.control.models, self.catalog, self.explorer,
                                    settings.log_beams if settings.log_impressions else 0,
                                    settings.organic_beam, self.controller.organic_width,
                                    settings.score_catalogue_max, self.exposure)
            log.info("ab.enabled", control_share=settings.control_share,
                     control_version=settings.control_version)
        self.router = BucketRouter(self.engine, control_engine, self.control,
                                   settings.control_share)
        self.batcher = Batcher(self.router.run, self.controller, settings.max_batch_size,
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
        self._control_records: list[ModelUpdate] = []
        """Records of the control version seen while it is not loaded (newest last)."""
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

    def assign(self, user_id: str) -> str:
        """The A/B bucket of ``user_id`` (``""`` without a control bucket)."""
        return assign(user_id, self.settings.control_share, self.settings.ab_salt)

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
            self._after_online_load()
        if self.updates_follower is not None:
            self.updates_follower.start()
        else:
            self._load_control(initial=True)

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
            if self.control is not None:   # first: the servable-ads gauge is the online's
                self.control.on_catalog_change()
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
            if self.control is not None:
                self.control.on_organic_change()
            self.models.on_organic_change()

    def _on_updates(self, batch: list[tuple[bytes | None, Any]]) -> None:
        for _key, rec in batch:
            if not isinstance(rec, ModelUpdate) or rec.model_name != self.settings.model_name:
                continue
            if self.control is not None and self.control.wanted != PRETRAINED \
                    and self.control.state is None and rec.version == self.control.wanted:
                self._control_records.append(rec)
            if self._updates_initial_done:
                self.models.apply_update(rec)
                self._after_online_load()
                self._load_control(initial=False)
            else:
                self._initial_updates.append(rec)

    def _updates_caught_up(self) -> None:
        pending, self._initial_updates = self._initial_updates, []
        self._updates_initial_done = True
        if pending:
            self.models.start_from(pending)
            self._after_online_load()
        self._load_control(initial=True)

    # -- the control bucket ------------------------------------------------------------
    def _after_online_load(self) -> None:
        """Pin the online bucket's version as the control when it is the control
        (``pretrained``: the first version loaded), else give the control the ads placed
        since (:meth:`ControlModel.adopt_new_ads`), and show both versions."""
        if self.control is not None and not self.control.after_online_load():
            self.control.adopt_new_ads()
        self.router.refresh()

    def _load_control(self, initial: bool) -> None:
        """A ``vNNN`` control not loaded yet: from its newest record (the older ones
        when that fails); at start, with no record at all, from the control cache."""
        control = self.control
        if control is None or control.state is not None or control.wanted == PRETRAINED:
            return
        records, self._control_records = self._control_records, []
        for rec in reversed(records):
            if control.load(rec) == "ok":
                break
        else:
            if initial and not records and control.load_cached() != "ok":
                log.info("ab.control_waiting", version=control.wanted,
                         detail="no model-updates record of the control version yet; "
                         "control users are served by the online model, bucket \"\"")
        self.router.refresh()

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
            "ab": self.router.describe(),
            "waiting_for": waiting,
        }
        return not waiting, detail
