"""The live A/B test: a control bucket of users served by a pinned model.

``--control-share s`` (0 = no test) puts a stable share ``s`` of the users in the
**control** bucket and the rest in the **online** bucket (:func:`assign`: a keyed hash of
``(ab_salt, user_id)``, the same in every process, replica and restart). The online
bucket is served as without a test: the model that follows ``model-updates`` (hot swap,
rollback, refusals). The control bucket is served by a **pinned** model
(:class:`ControlModel`), which no ``model-updates`` record swaps and nothing evicts:

* ``--control-version pretrained``: the first version this server loads (``--snapshot``,
  or the first ``model-updates`` record it serves). The control shares that version's
  loaded sessions with the online bucket (no second copy in memory) and keeps them when
  the online bucket moves on.
* ``--control-version vNNN``: that version, fetched and verified like any other
  (sha256 of the manifest from its ``model-updates`` record, every file's sha256, load,
  warm-up, parity) into its own cache (``<cache-dir>/control-model``), from the copy
  already there, the record's ``uri`` or the online cache, in that order; or shared when
  the online bucket serves it. Without a record (retention dropped it), a copy left in
  the control cache by an earlier run is loaded, checked against its own manifest.

Both buckets run in one batcher (:class:`BucketRouter`): a batch is split by bucket and
each part runs on its bucket's engine, with the same load controller (beam widths),
exploration policy (one exposure count per ad) and catalogue (budgets, pauses), so what
either bucket serves feeds back on both.

Until the control model is loaded, a control user is served by the online model as a
user outside the test: the impression's ``bucket`` is ``""`` and its ``model_version``
the online one (counted in ``adloop_server_ab_control_unavailable_total``). The bucket
of an impression always names the arm that really served it; neither arm receives
traffic of the other's users.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from server import metrics as M
from server.catalog import AdCatalog, OrganicCatalog
from server.engine import Engine, RecRequest, RecResult
from server.models import ModelManager, ServingState, VersionInfo
from server.trie import sort_ids
from streams.logs import get_logger
from streams.metrics import counter, gauge
from streams.schemas import ModelUpdate

log = get_logger(__name__)

CONTROL = "control"
ONLINE = "online"
BUCKETS = (ONLINE, CONTROL)
PRETRAINED = "pretrained"

AB_REQUESTS = counter(
    "adloop_server_ab_requests_total",
    "Valid /v1/recommend requests by the A/B bucket their user is assigned to (whatever "
    "the answer); only with a control bucket (control_share > 0).", ("bucket",))
AB_IMPRESSIONS = counter(
    "adloop_server_ab_impressions_total",
    "Slates served (one impression each) by the bucket whose model served them.",
    ("bucket",))
AB_CONTROL_UNAVAILABLE = counter(
    "adloop_server_ab_control_unavailable_total",
    "Control users served by the online model outside the test (bucket \"\") because "
    "the control model is not loaded yet.")
AB_MODEL_INFO = gauge(
    "adloop_server_ab_model_version_info",
    "1 for the model version each A/B bucket serves (the control's once it is loaded).",
    ("bucket", "version"))
AB_CONTROL_SHARE = gauge(
    "adloop_server_ab_control_share_ratio",
    "Configured share of users in the control bucket (0 = no A/B test).")


def bucket_point(user_id: str, salt: str) -> float:
    """The user's point in [0, 1): the first 8 bytes of BLAKE2b(salt, user_id), the
    same in every process (no per-process hash seed)."""
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8,
                             key=salt.encode("utf-8")[:64]).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def assign(user_id: str, share: float, salt: str) -> str:
    """``control`` when the user's point is below ``share``, else ``online``; ``""``
    without a test (``share`` = 0)."""
    if share <= 0.0:
        return ""
    return CONTROL if bucket_point(user_id, salt) < share else ONLINE


class ControlModel:
    """The pinned control model: a :class:`ModelManager` of its own that only ever
    holds the control version (never a ``model-updates`` swap, never a rollback, never
    evicted), over the server's catalogues.

    Writes to the process-wide serving gauges that ``ModelManager`` sets on a load
    (``model_version_info``, the data watermark, swap time, servable ads and organic
    items) are put back to the online model's values afterwards: those gauges describe
    the online bucket; :data:`AB_MODEL_INFO` shows both."""

    def __init__(self, version: str, online: ModelManager, catalog: AdCatalog,
                 organic: OrganicCatalog | None, cache_dir: Path,
                 manager: ModelManager) -> None:
        self.wanted = version
        """``pretrained`` or a version id."""
        self.online = online
        self.catalog = catalog
        self.organic = organic
        self.cache_dir = cache_dir
        self.online_cache_dir = online.cache_dir
        self.models = manager
        self.source = ""
        """How the control was pinned: ``shared`` (the online bucket's loaded version)
        or ``loaded`` (a load of its own)."""
        self.detail = "waiting for the first version this server loads" \
            if version == PRETRAINED else f"waiting for {version}"
        self._lock = threading.Lock()

    @property
    def state(self) -> ServingState | None:
        return self.models.state

    @property
    def version(self) -> str | None:
        return self.models.version

    # -- pinning ---------------------------------------------------------------------
    def after_online_load(self) -> bool:
        """Call after the online manager loaded a version: pins it when it is the
        control (``pretrained``: the first one; ``vNNN``: that one). True if pinned now."""
        state = self.online.state
        if self.state is not None or state is None:
            return False
        if self.wanted != PRETRAINED and state.model.version != self.wanted:
            return False
        with self._lock:
            if self.state is not None:
                return False
            model = state.model
            info = VersionInfo(model.version, model.update, model.directory, "serving",
                               "shared with the online bucket", time.time())
            self.models.versions[model.version] = info
            self.models.history.append(model.version)
            # the same sessions and tries (one object: the explorer's exposure mask is
            # not rebuilt while both buckets serve it); catalogue changes rebuild the
            # control's own
            self.models.state = state
            self.source, self.detail = "shared", ""
        log.info("ab.control_pinned", version=model.version, source="shared",
                 wanted=self.wanted)
        return True

    def load(self, update: ModelUpdate) -> str:
        """Load the announced control version (``vNNN``) through every check; returns
        ``ok`` or the last failed step. Tries the control cache, the record's ``uri``
        and the online cache, in that order."""
        if self.state is not None or self.wanted == PRETRAINED \
                or update.version != self.wanted:
            return "ok" if self.state is not None else "not_control"
        result = "fetch"
        with self._lock:
            for uri in self._sources(update):
                result = self.models.apply_update(msgspec.structs.replace(update, uri=uri))
                if result == "ok":
                    break
            self._restore_online_gauges()
        if result == "ok":
            self.source, self.detail = "loaded", ""
            log.info("ab.control_pinned", version=update.version, source="loaded")
        else:
            self.detail = f"{update.version} refused at {result}; waiting for another record"
            log.warning("ab.control_refused", version=update.version, step=result)
        return result

    def load_cached(self) -> str:
        """Without any ``model-updates`` record of the control version: the copy an
        earlier run left in the control cache, checked against its own manifest."""
        if self.state is not None or self.wanted == PRETRAINED:
            return "not_control"
        local = self.cache_dir / self.wanted
        try:
            version = json.loads((local / "manifest.json").read_bytes()).get("version")
        except (OSError, ValueError, AttributeError):
            return "fetch"
        if version != self.wanted:
            return "manifest"
        with self._lock:
            result = self.models.load_directory(local)
            self._restore_online_gauges()
        if result == "ok":
            self.source, self.detail = "loaded", ""
            log.info("ab.control_pinned", version=self.wanted, source="cache")
        return result

    def _sources(self, update: ModelUpdate) -> list[str]:
        out = []
        cached = self.cache_dir / update.version
        if (cached / "manifest.json").is_file():
            out.append(str(cached))
        out.append(update.uri)
        online_copy = self.online_cache_dir / update.version
        if (online_copy / "manifest.json").is_file():
            out.append(str(online_copy))
        return out

    def _restore_online_gauges(self) -> None:
        """Give the online bucket's values back to the gauges a control load set."""
        version = self.version
        online = self.online.state
        if version is not None and (online is None or online.model.version != version):
            info = self.online.versions.get(version)
            if info is not None and info.status == "kept":
                M.MODEL_INFO.labels(version).set(0)
            else:
                with contextlib.suppress(KeyError):
                    M.MODEL_INFO.remove(version)
        if online is None:
            return
        if online.model.data_watermark is not None:
            M.WATERMARK.set(online.model.data_watermark)
        serving = self.online.versions.get(online.model.version)
        if serving is not None and serving.loaded_at is not None:
            M.SWAP_TIME.set(serving.loaded_at)
        M.SERVABLE_ADS.set(online.trie.n_ads)
        M.ORGANIC_ITEMS.set(online.organic_trie.n_ads if online.organic_trie else 0)

    def adopt_new_ads(self) -> bool:
        """Call after the online manager loaded a version: when it is a newer version of
        the control's id space whose id table holds every control ad under the same id
        and more (ads the learner placed since), the control takes that id table and
        keeps its graphs, so the control bucket can serve the new ads as the online
        bucket does (its model scores any id; only its table lacked them). True when
        the table was taken."""
        control, online = self.state, self.online.state
        if control is None or online is None:
            return False
        mine, theirs = control.model.manifest, online.model.manifest
        if theirs.id_space_version != mine.id_space_version \
                or len(theirs.ad_ids) <= len(mine.ad_ids) \
                or theirs.level_sizes != mine.level_sizes:
            return False
        row = {a: i for i, a in enumerate(theirs.ad_ids)}
        same = [row.get(a, -1) for a in mine.ad_ids]
        if min(same, default=0) < 0 or not np.array_equal(theirs.ids[same], mine.ids):
            log.warning("ab.control_ids_differ", control=mine.version,
                        online=theirs.version, effect="the control keeps its own id table")
            return False
        with self._lock:
            control = self.state
            assert control is not None
            manifest = replace(control.model.manifest, ad_ids=list(theirs.ad_ids),
                               ids=theirs.ids)
            model = replace(control.model, manifest=manifest, order=sort_ids(theirs.ids),
                            row_of={a: i for i, a in enumerate(theirs.ad_ids)})
            self.models.state = replace(control, model=model,
                                        trie=self.models.build_trie(model),
                                        catalog_generation=self.catalog.generation)
        log.info("ab.control_ids_refreshed", version=mine.version, ids_from=theirs.version,
                 ads=len(theirs.ad_ids), new_ads=len(theirs.ad_ids) - len(mine.ad_ids))
        return True

    # -- the catalogues --------------------------------------------------------------
    def on_catalog_change(self) -> None:
        """Rebuild the control's trie of servable ads (call before the online one's, so
        that the servable-ads gauge ends on the online value)."""
        self.models.on_catalog_change()

    def on_organic_change(self) -> None:
        self.models.on_organic_change()

    def describe(self) -> dict[str, Any]:
        state = self.state
        return {"version": state.model.version if state else None, "wanted": self.wanted,
                "source": self.source or None, "detail": self.detail,
                "loaded_at": self.models.versions[state.model.version].loaded_at
                if state and state.model.version in self.models.versions else None}


@dataclass(frozen=True)
class RoutedRequest:
    """A request and the bucket its user is assigned to (``""``: no test)."""

    request: RecRequest
    bucket: str


@dataclass(frozen=True)
class ServedResult:
    """What answered a request: the bucket whose model served it (``""``: outside the
    test) and the engine's result (its ``model_version`` is the version that served)."""

    result: RecResult
    bucket: str


class BucketRouter:
    """The batcher's model call: splits a batch by bucket and runs each part on its
    bucket's engine (one after the other on the same worker thread, with the same
    ``widths_for``, so the load controller sees one batch)."""

    def __init__(self, online: Engine, control: Engine | None,
                 control_model: ControlModel | None, share: float) -> None:
        self.online = online
        self.control = control
        self.control_model = control_model
        self.share = share
        self._shown: dict[str, str] = {}
        self._info_lock = threading.Lock()
        AB_CONTROL_SHARE.set(share)

    @property
    def active(self) -> bool:
        return self.share > 0.0 and self.control is not None

    def run(self, items: list[RoutedRequest], widths_for: Any) -> list[ServedResult]:
        if not self.active:
            return [ServedResult(r, "") for r in
                    self.online.run([i.request for i in items], widths_for)]
        assert self.control is not None and self.control_model is not None
        control_ready = self.control_model.state is not None
        served: list[ServedResult | None] = [None] * len(items)
        parts: dict[str, list[int]] = {ONLINE: [], CONTROL: [], "": []}
        for n, item in enumerate(items):
            bucket = item.bucket
            if bucket == CONTROL and not control_ready:
                bucket = ""                  # outside the test until the control loads
                AB_CONTROL_UNAVAILABLE.inc()
            parts[bucket if bucket in parts else ONLINE].append(n)
        online_idx = parts[ONLINE] + parts[""]
        if online_idx:
            out = self.online.run([items[n].request for n in online_idx], widths_for)
            labels = [ONLINE] * len(parts[ONLINE]) + [""] * len(parts[""])
            for n, res, label in zip(online_idx, out, labels, strict=True):
                served[n] = ServedResult(res, label)
        if parts[CONTROL]:
            out = self.control.run([items[n].request for n in parts[CONTROL]], widths_for)
            for n, res in zip(parts[CONTROL], out, strict=True):
                served[n] = ServedResult(res, CONTROL)
        done = [s for s in served if s is not None]
        assert len(done) == len(items)
        for s in done:
            if s.bucket:
                AB_IMPRESSIONS.labels(s.bucket).inc()
                self.show_version(s.bucket, s.result.model_version)
        return done

    def show_version(self, bucket: str, version: str | None) -> None:
        """Keep :data:`AB_MODEL_INFO` on the version ``bucket`` serves (cheap when
        unchanged: called for every served request and after every load)."""
        if version is None or self._shown.get(bucket) == version:
            return
        with self._info_lock:
            old = self._shown.get(bucket)
            if old == version:
                return
            if old is not None:
                with contextlib.suppress(KeyError):
                    AB_MODEL_INFO.remove(bucket, old)
            AB_MODEL_INFO.labels(bucket, version).set(1)
            self._shown[bucket] = version

    def refresh(self) -> None:
        """Both buckets' versions into :data:`AB_MODEL_INFO` (after a load or rollback)."""
        if not self.active:
            return
        self.show_version(ONLINE, self.online.models.version)
        if self.control_model is not None:
            self.show_version(CONTROL, self.control_model.version)

    def describe(self) -> dict[str, Any]:
        """The A/B part of ``/v1/models`` and ``/readyz``."""
        if not self.active:
            return {"control_share": 0.0}
        assert self.control_model is not None
        return {"control_share": self.share,
                "online": {"version": self.online.models.version},
                "control": self.control_model.describe()}
