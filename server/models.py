"""Serving versions: load, verify, warm up, swap, roll back.

One immutable :class:`ServingState` (model + trie of servable ads) is what every
batch reads, through a single reference that writers replace atomically. A new
version goes through these steps, each with its own failure name (the ``result``
label of ``adloop_server_swaps_total``); any failure keeps the old state:

1. fetch ``manifest.json`` and its files into the local cache, verifying the
   manifest's sha256 (from ``model-updates``) and every file's sha256   (fetch, checksum, manifest)
2. load the three onnxruntime sessions beside the serving ones            (load)
3. warm up: a beam search over the whole id table (and one over the organic items when
   the snapshot has them); every output must be finite               (warmup, nan)
4. run the manifest's parity inputs and compare with its references          (parity)
5. build the trie of servable ads for the new id table, swap the reference, and drop
   the old state (its sessions are freed once no in-flight batch holds them).

The trie of the snapshot's organic items (``organic_ids``) is built the same way: the
model keeps the full one (warm-up), the state the one of the servable items. With an
organic catalogue (the server follows ``organic-items``) an item is servable when its
latest record there is ``active``: a removal rebuilds only the organic trie, an ``ads``
change only the ads' trie. Without one (in-process serving) every item of the
snapshot is servable. An item the snapshot has no id for waits for a snapshot that has
one, like a new ad (the learner places both online and publishes an id-table update).

The last ``keep_versions`` verified versions stay in the cache for rollback; a
rollback re-verifies the cached files and goes through steps 2-5 again.

Every swap (steps 1-5, a rollback, a local directory) runs inside ``swap_guard`` (the
load controller's :meth:`~server.controller.BeamController.swapping`), so that the
slowdown it causes to the batches running beside it is not taken for load.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import shutil
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from server import metrics as M
from server.beam import beam_search
from server.catalog import AdCatalog, OrganicCatalog
from server.runtime import ModelRuntime, Provider, check_parity
from server.snapshot import fetch_snapshot, verify_local
from server.trie import Trie, build_trie, sort_ids
from snapshot_format import Manifest, SnapshotRejectedError
from streams.logs import get_logger
from streams.schemas import ModelUpdate

log = get_logger(__name__)


def _libc_malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_heap() -> None:
    """Hand the heap pages a swapped-out model freed back to the OS (glibc's
    ``malloc_trim``); without it glibc keeps them for reuse and RSS creeps up."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True)
class LoadedModel:
    version: str
    manifest: Manifest
    runtime: ModelRuntime
    directory: Path
    update: ModelUpdate | None
    order: np.ndarray                       # lexicographic order of manifest.ids
    row_of: dict[str, int]
    loaded_at: float
    organic_trie: Trie | None = None
    """Trie over ``manifest.organic_table`` (every row); None without organic items."""
    organic_row_of: dict[str, int] = field(default_factory=dict)
    """Organic item id -> row of ``manifest.organic_table``."""
    organic_order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Lexicographic order of ``manifest.organic_table``."""

    @property
    def data_watermark(self) -> float | None:
        return self.update.data_watermark if self.update is not None else None


@dataclass(frozen=True)
class ServingState:
    model: LoadedModel
    trie: Trie
    catalog_generation: int
    organic_trie: Trie | None = None
    """Trie of the servable organic items (None: the snapshot has none)."""
    organic_generation: int = 0


@dataclass
class VersionInfo:
    version: str
    update: ModelUpdate | None
    directory: Path | None = None
    status: str = "seen"            # seen | serving | kept | failed
    detail: str = ""
    loaded_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ModelManager:
    """Owns the serving reference and the kept versions."""

    def __init__(self, catalog: AdCatalog, provider: Provider, cache_dir: Path,
                 keep_versions: int = 3, intra_op_threads: int = 0, device_id: int = 0,
                 warmup_widths: list[int] | None = None,
                 swap_guard: Callable[[], AbstractContextManager[None]] | None = None,
                 organic: OrganicCatalog | None = None) -> None:
        self.catalog = catalog
        self.organic = organic
        """The ``organic-items`` catalogue (None: every organic item of a snapshot is
        servable)."""
        self.provider = provider
        self.cache_dir = Path(cache_dir)
        self.keep_versions = keep_versions
        self.intra_op_threads = intra_op_threads
        self.device_id = device_id
        self.warmup_widths = warmup_widths or [8]
        self.swap_guard = swap_guard or contextlib.nullcontext
        self.state: ServingState | None = None
        self.versions: OrderedDict[str, VersionInfo] = OrderedDict()
        self._lock = threading.RLock()       # writers only; readers use self.state
        self.history: list[str] = []         # versions in the order they started serving
        M.PROVIDER_INFO.labels(provider.ort_name).set(1)

    # -- the read side ---------------------------------------------------------------
    @property
    def version(self) -> str | None:
        s = self.state
        return s.model.version if s is not None else None

    # -- loading ---------------------------------------------------------------------
    def apply_update(self, update: ModelUpdate) -> str:
        """Load and swap to ``update``; returns the result (``ok`` or the failed step)."""
        if self.version == update.version:
            return "ok"
        serving = self.state.model.data_watermark if self.state is not None else None
        if serving is not None and update.data_watermark < serving:
            # a replayed or stray announcement of older data: never go back in freshness
            # on our own (operators roll back explicitly through the admin API)
            M.SWAPS.labels("stale").inc()
            log.warning("model.rejected", version=update.version, step="stale",
                        detail=f"data watermark {update.data_watermark} is older than the "
                        f"serving version's {serving}", serving=self.version)
            return "stale"
        info = self.versions.get(update.version) or VersionInfo(update.version, update)
        self.versions[update.version] = info
        self.versions.move_to_end(update.version)
        started = time.perf_counter()
        with self.swap_guard():
            try:
                directory, manifest = fetch_snapshot(update.uri, update.sha256,
                                                     self.cache_dir, update.version)
            except SnapshotRejectedError as exc:
                return self._failed(info, exc, started)
            info.directory = directory
            return self._load_and_swap(info, directory, manifest, update, started)

    def load_directory(self, directory: Path) -> str:
        """Serve a local snapshot directory (``--snapshot``); its files are verified
        against its own manifest."""
        started = time.perf_counter()
        with self.swap_guard():
            try:
                local, manifest = fetch_snapshot(str(directory), None, self.cache_dir)
            except SnapshotRejectedError as exc:
                info = VersionInfo(str(directory), None)
                return self._failed(info, exc, started)
            info = self.versions.get(manifest.version) or VersionInfo(manifest.version, None)
            self.versions[manifest.version] = info
            info.directory = local
            return self._load_and_swap(info, local, manifest, None, started)

    def start_from(self, updates: list[ModelUpdate]) -> str | None:
        """At start: serve the newest update that passes, trying older ones after it;
        the ones before it are fetched and verified as rollback candidates."""
        serving: str | None = None
        older: list[ModelUpdate] = []
        for i in range(len(updates) - 1, -1, -1):
            if self.apply_update(updates[i]) == "ok":
                serving, older = updates[i].version, updates[:i]
                break
        candidates = [u for u in older if u.version != serving][-(self.keep_versions - 1):] \
            if self.keep_versions > 1 else []
        for update in candidates:
            self.prefetch(update)
        return serving

    def prefetch(self, update: ModelUpdate) -> bool:
        """Fetch and verify checksums of a version without serving it (a rollback
        candidate; loading, warm-up and parity run when it is rolled back to)."""
        with self._lock:
            info = self.versions.get(update.version) or VersionInfo(update.version, update)
            try:
                directory, _ = fetch_snapshot(update.uri, update.sha256, self.cache_dir,
                                              update.version)
            except SnapshotRejectedError as exc:
                info.status, info.detail = "failed", str(exc)[:500]
                self.versions[update.version] = info
                return False
            info.directory, info.status = directory, "kept"
            self.versions[update.version] = info
            self.versions.move_to_end(update.version, last=False)
            if update.version not in self.history:
                self.history.insert(max(0, len(self.history) - 1), update.version)
            return True

    def rollback(self, version: str | None = None) -> tuple[str, str]:
        """Serve a kept version again (default: the one served before the current one).
        Returns (result, version)."""
        with self._lock:
            current = self.version
            if version is None:
                prior = [v for v in reversed(self.history) if v != current
                         and v in self.versions and self.versions[v].status == "kept"]
                if not prior:
                    return "no_candidate", ""
                version = prior[0]
            info = self.versions.get(version)
            if info is None or info.directory is None or info.status not in ("kept", "serving"):
                return "no_candidate", version
            if version == current:
                return "ok", version
            started = time.perf_counter()
            with self.swap_guard():
                try:
                    manifest = verify_local(info.directory,
                                            info.update.sha256 if info.update else None)
                except (SnapshotRejectedError, OSError) as exc:
                    err = exc if isinstance(exc, SnapshotRejectedError) else \
                        SnapshotRejectedError("checksum", repr(exc))
                    return self._failed(info, err, started), version
                result = self._load_and_swap(info, info.directory, manifest, info.update,
                                             started, ok_label="rollback")
            return ("ok" if result == "rollback" else result), version

    def _load_and_swap(self, info: VersionInfo, directory: Path, manifest: Manifest,
                       update: ModelUpdate | None, started: float,
                       ok_label: str = "ok") -> str:
        with self._lock:
            try:
                model = self._load(directory, manifest, update)
            except SnapshotRejectedError as exc:
                return self._failed(info, exc, started)
            old = self.state
            generation = self.catalog.generation     # read before the mask: never newer
            organic_gen = self.organic.generation if self.organic is not None else 0
            trie = self.build_trie(model)
            organic_trie = self._build_organic_trie(model)
            self.state = ServingState(model, trie, generation, organic_trie,
                                      organic_gen)   # the swap
            if old is not None:
                old_info = self.versions.get(old.model.version)
                if old_info is not None and old_info.status == "serving":
                    old_info.status = "kept"
                M.MODEL_INFO.labels(old.model.version).set(0)
            del old   # in-flight batches keep their own reference until they finish
            release_free_heap()
            info.status, info.detail, info.loaded_at = "serving", "", time.time()
            self.history.append(model.version)
            self._evict()
            elapsed = time.perf_counter() - started
            M.SWAPS.labels(ok_label).inc()
            M.LOAD_SECONDS.observe(elapsed)
            M.MODEL_INFO.labels(model.version).set(1)
            M.SWAP_TIME.set(time.time())
            if model.data_watermark is not None:
                M.WATERMARK.set(model.data_watermark)
            M.SERVABLE_ADS.set(trie.n_ads)
            organic = organic_trie.n_ads if organic_trie is not None else 0
            M.ORGANIC_ITEMS.set(organic)
            log.info("model.swapped", version=model.version, result=ok_label,
                     seconds=round(elapsed, 3), servable=trie.n_ads, organic_items=organic)
            return ok_label

    def _failed(self, info: VersionInfo, exc: SnapshotRejectedError, started: float) -> str:
        if info.status != "serving":
            info.status, info.detail = "failed", str(exc)[:500]
            if info.directory is not None:
                shutil.rmtree(info.directory, ignore_errors=True)
                info.directory = None
        M.SWAPS.labels(exc.step).inc()
        M.LOAD_SECONDS.observe(time.perf_counter() - started)
        log.warning("model.rejected", version=info.version, step=exc.step,
                    detail=exc.detail[:300], serving=self.version)
        self._evict()
        return exc.step

    def _same_graphs(self, manifest: Manifest) -> ModelRuntime | None:
        """The serving model's runtime when ``manifest`` names byte-identical graphs (an
        id-table update: new ads placed in the same model), else None."""
        state = self.state
        if state is None:
            return None
        files = state.model.manifest.files
        same = set(files) == set(manifest.files) and all(
            files[n].get("sha256") == m.get("sha256") for n, m in manifest.files.items())
        return state.model.runtime if same else None

    def _load(self, directory: Path, manifest: Manifest,
              update: ModelUpdate | None) -> LoadedModel:
        shared = self._same_graphs(manifest)
        try:
            runtime = shared or ModelRuntime(directory, self.provider, self.intra_op_threads,
                                             self.device_id)
        except Exception as exc:
            raise SnapshotRejectedError("load", repr(exc)[:500]) from None
        order = sort_ids(manifest.ids)
        organic = manifest.organic_table
        organic_order = sort_ids(organic)
        organic_trie = (build_trie(organic, organic_order, np.ones(len(organic), bool),
                                   manifest.level_sizes) if len(manifest.organic_ids) else None)
        model = LoadedModel(manifest.version, manifest, runtime, directory, update, order,
                            {a: i for i, a in enumerate(manifest.ad_ids)}, time.time(),
                            organic_trie,
                            {a: i for i, a in enumerate(manifest.organic_ids)}, organic_order)
        self._warm_up(model)
        if shared is not None:      # the same graphs passed parity when they were loaded
            return model
        try:
            check_parity(runtime, manifest.parity)
        except ValueError as exc:
            raise SnapshotRejectedError("parity", str(exc)) from None
        except Exception as exc:
            raise SnapshotRejectedError("parity", repr(exc)[:500]) from None
        return model

    def _warm_up(self, model: LoadedModel) -> None:
        """A real beam search for two requests over every id, and one over every organic
        item when the snapshot has them; all outputs finite."""
        man, rt = model.manifest, model.runtime
        T, H, C = man.id_len, man.history_len, len(man.context_features) + man.organic_len
        B = 2
        history = np.zeros((B, H, T), np.int64)
        hmask = np.zeros((B, H), np.float32)
        n = min(H, len(man.ad_ids))
        if n:
            history[0, :n] = man.ids[:n]
            hmask[0, :n] = 1
        context = np.zeros((B, C), np.int64)
        context[0] = np.arange(1, C + 1) % max(2, man.context_buckets)

        def finite(name: str, *arrays: np.ndarray) -> None:
            for a in arrays:
                if not np.isfinite(a).all():
                    raise SnapshotRejectedError("nan", f"{name} produced non-finite values in "
                                           "warm-up")
        try:
            states = rt.encode(history, hmask, context)
            finite("encoder", *states.arrays())

            def step(req: np.ndarray, prefix: np.ndarray) -> np.ndarray:
                logits = rt.step(states, req, prefix)
                finite("decoder_step", logits)
                return logits

            trie = build_trie(man.ids, model.order, np.ones(len(man.ad_ids), bool),
                              man.level_sizes)
            widths = (self.warmup_widths * T)[:T] if len(self.warmup_widths) < T \
                else self.warmup_widths[:T]
            beams = beam_search(step, trie, B, widths)
            cand = (man.ids[:4] if len(man.ad_ids) else np.zeros((1, T), np.int64))
            pctr, pcvr = rt.value(states, np.stack([cand] * B))
            finite("value", pctr, pcvr)
            if len(man.ad_ids) and beams.request.shape[0] == 0:
                raise SnapshotRejectedError("warmup", "beam search found no ids")
            if model.organic_trie is not None:
                organic = beam_search(step, model.organic_trie, B, widths)
                if organic.request.shape[0] == 0:
                    raise SnapshotRejectedError("warmup", "organic search found no ids")
                if not np.isfinite(organic.logprob).all():
                    raise SnapshotRejectedError("nan", "organic search produced non-finite "
                                                "log-probabilities in warm-up")
        except SnapshotRejectedError:
            raise
        except Exception as exc:
            raise SnapshotRejectedError("warmup", repr(exc)[:500]) from None

    # -- the catalog side ------------------------------------------------------------
    def build_trie(self, model: LoadedModel) -> Trie:
        """The trie of ``model``'s ids whose ads the catalogue can serve now."""
        mask = self.catalog.servable_mask(model.manifest.ad_ids)
        return build_trie(model.manifest.ids, model.order, mask, model.manifest.level_sizes)

    def _build_organic_trie(self, model: LoadedModel) -> Trie | None:
        if model.organic_trie is None or self.organic is None:
            return model.organic_trie
        mask = self.organic.servable_mask(list(model.manifest.organic_ids))
        return build_trie(model.manifest.organic_table, model.organic_order, mask,
                          model.manifest.level_sizes)

    def on_catalog_change(self) -> None:
        """Rebuild the trie for the serving model and swap the state reference."""
        with self._lock:
            state = self.state
            if state is None or state.catalog_generation == self.catalog.generation:
                return
            gen = self.catalog.generation
            trie = self.build_trie(state.model)
            self.state = replace(state, trie=trie, catalog_generation=gen)
            M.SERVABLE_ADS.set(trie.n_ads)

    def on_organic_change(self) -> None:
        """Rebuild the organic trie for the serving model (an item removed, or one of the
        snapshot's items active again) and swap the state reference."""
        with self._lock:
            state = self.state
            if state is None or self.organic is None \
                    or state.organic_generation == self.organic.generation:
                return
            gen = self.organic.generation
            organic_trie = self._build_organic_trie(state.model)
            self.state = replace(state, organic_trie=organic_trie, organic_generation=gen)
            M.ORGANIC_ITEMS.set(organic_trie.n_ads if organic_trie is not None else 0)

    # -- bookkeeping -----------------------------------------------------------------
    def _evict(self) -> None:
        """Keep ``keep_versions`` verified versions (and a bounded list of failures)."""
        kept = [v for v, i in self.versions.items() if i.status in ("kept", "serving")]
        for v in kept[: max(0, len(kept) - self.keep_versions)]:
            info = self.versions[v]
            if info.status == "serving":
                continue
            info.status = "evicted"
            with contextlib.suppress(KeyError):
                M.MODEL_INFO.remove(v)
            if info.directory is not None:
                shutil.rmtree(info.directory, ignore_errors=True)
                info.directory = None
        stale = [v for v, i in self.versions.items() if i.status in ("failed", "evicted",
                                                                       "seen")]
        for v in stale[: max(0, len(stale) - 2 * self.keep_versions)]:
            info = self.versions.pop(v)
            if info.directory is not None and info.status != "serving":
                shutil.rmtree(info.directory, ignore_errors=True)
        if len(self.history) > 4 * self.keep_versions:
            del self.history[: len(self.history) - 4 * self.keep_versions]

    def describe(self) -> dict[str, Any]:
        return {
            "serving": self.version,
            "provider": self.provider.name,
            "versions": [
                {"version": i.version, "status": i.status, "detail": i.detail,
                 "loaded_at": i.loaded_at,
                 "data_watermark": i.update.data_watermark if i.update else None,
                 "uri": i.update.uri if i.update else None}
                for i in self.versions.values()],
        }

