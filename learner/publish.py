"""From a trained model to a served snapshot: export, promotion guard, store, announce.

``Publisher.publish(model, ...)`` runs, in order:

1. **export** the model to ONNX + manifest in a local staging directory
   (``learner.export.export_snapshot``; it already refuses ORT/torch parity beyond
   the manifest's tolerance);
2. **guard**: every parameter and every parity output finite (no NaN/inf), and the
   candidate's estimate on held-out lists (money per impression) not below the best of
   the references — the pretrained baseline, the best version published so far and the
   serving one, each evaluated on the same held-out lists by the same estimate — by
   more than ``max_regression`` (relative). Comparing with the last version only let
   small steps ratchet down. The estimate (``estimate``, the learner's
   ``--guard-estimate``, :mod:`learner.guard`) is ``holdout_value``
   (:meth:`learner.rspo_step.OnlineLearner.holdout_value`, the value-weighted estimate
   over the shown items) or an off-policy estimate on the lists with logging
   propensities (``snips``, ``dr``); the manifest's metrics hold it as
   ``holdout_<estimate>`` (``holdout_value`` for the default) and each reference's as
   ``<reference>_holdout_<estimate>``;
3. **store**: copy the files to ``{store}/{version}/`` — a directory (written to a
   temporary name, then renamed) or any fsspec URL;
4. the caller checkpoints, then **announces** the version on ``model-updates``
   (``announce``), so a crash between the two re-announces the same version on restart
   instead of training a different model under that name. The record is signed as it is
   sent (:class:`UpdateSigner`, HMAC-SHA256 under the keyring's signing key,
   :mod:`streams.signing`): servers fetch nothing a record names before its signature
   verifies (docs/security.md).

A refused snapshot is logged, counted in ``adloop_learner_snapshots_refused_total``
with its reason, and never stored or announced.

``Publisher.republish(source, version, ...)`` serves an earlier version again (the live
A/B rollback, docs/abtest.md): the stored snapshot's graphs, unchanged, under a new
version id with the tokenizer's current id table and a newer data watermark
(:func:`learner.export.export_ids_update`), so the servers take it through their usual
signature, snapshot-base, checksum and parity checks and hot swap. ``protect`` names the
versions pruning must keep (the control version and the rollback candidates).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch

from learner.export import SnapshotError, export_ids_update, export_snapshot
from learner.model import GenerativeRecommender
from learner.tokenizer import UASIDTokenizer
from streams.kafka_io import EventProducer
from streams.logs import get_logger
from streams.metrics import counter, histogram
from streams.schemas import ModelUpdate
from streams.signing import Keyring, sign_update

log = get_logger(__name__)

EXPORT_SECONDS = histogram("adloop_learner_export_seconds",
                           "Wall time to export a snapshot to ONNX (with parity check).")
VALIDATE_SECONDS = histogram("adloop_learner_validation_seconds",
                             "Wall time of the promotion guard (NaN check + holdout metric).")
PUBLISHED = counter("adloop_learner_snapshots_published_total", "Snapshots stored and announced.")
REFUSED = counter("adloop_learner_snapshots_refused_total",
                  "Snapshots not published (promotion guard or store unavailable), by reason.",
                  ("reason",))


@dataclass(frozen=True)
class UpdateSigner:
    """The key ``model-updates`` records are signed with (its secret is never shown)."""

    key_id: str
    secret: bytes = field(repr=False)

    @classmethod
    def of(cls, keyring: Keyring, key_id: str | None = None) -> UpdateSigner:
        """``key_id`` of ``keyring`` (default: its last key)."""
        return cls(*keyring.signing_key(key_id))

    def sign(self, update: ModelUpdate) -> ModelUpdate:
        return sign_update(update, self.key_id, self.secret)


class SnapshotRefusedError(RuntimeError):
    """The promotion guard refused a snapshot; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Published:
    version: str
    uri: str
    manifest_sha256: str
    manifest: dict[str, Any]
    export_s: float
    validate_s: float


def all_finite(model: GenerativeRecommender) -> bool:
    """Every parameter of ``model`` is finite (no NaN or inf): what a snapshot needs
    before anything else is checked."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _nested_finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, list):
        return all(_nested_finite(x) for x in obj)
    if isinstance(obj, dict):
        return all(_nested_finite(v) for v in obj.values())
    return True


class SnapshotStore:
    """Snapshots under one root: a local directory (default) or any fsspec URL.

    ``public_base_url`` (``--snapshot-base-url``) is where readers find the store when
    that differs from where the learner writes it: the learner writes a directory that
    a web server serves as ``http://host:port/``, and announces
    ``http://host:port/<version>`` so servers on other hosts need no shared volume.
    """

    def __init__(self, root: str, public_base_url: str | None = None) -> None:
        self.root = root.rstrip("/")
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.local = self.fs.protocol in ("file", ("file", "local")) or isinstance(
            self.fs, fsspec.implementations.local.LocalFileSystem)

    def uri(self, version: str) -> str:
        """The URI announced on ``model-updates`` for ``version``."""
        if self.public_base_url:
            return f"{self.public_base_url}/{version}"
        if self.local:
            return Path(self.path, version).resolve().as_uri()
        return f"{self.root}/{version}"

    def put(self, local_dir: Path, version: str) -> str:
        if self.local:
            dest = Path(self.path) / version
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{version}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(local_dir, tmp)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        else:
            # manifest last, so a reader that sees the manifest sees every file
            files = sorted(local_dir.iterdir(), key=lambda p: p.name == "manifest.json")
            for f in files:
                self.fs.put_file(str(f), f"{self.path}/{version}/{f.name}")
        return self.uri(version)

    def get(self, version: str, local_dir: Path) -> None:
        """Copy the stored ``version`` into ``local_dir`` (created; files only)."""
        local_dir.mkdir(parents=True, exist_ok=True)
        if self.local:
            for f in (Path(self.path) / version).iterdir():
                if f.is_file():
                    shutil.copyfile(f, local_dir / f.name)
            return
        for name in self.fs.ls(f"{self.path}/{version}", detail=False):
            self.fs.get_file(name, str(local_dir / Path(name).name))

    def versions(self) -> list[str]:
        try:
            names = [Path(p).name for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def prune(self, keep: int, protect: set[str] | None = None) -> list[str]:
        """Delete all but the newest ``keep`` versions (and never those in ``protect``)."""
        versions = self.versions()
        doomed = [v for v in versions[:-keep] if v not in (protect or set())] if keep else []
        for v in doomed:
            self.fs.rm(f"{self.path}/{v}", recursive=True)
        return doomed


class Publisher:
    """Export → guard → store for one model name; ``announce`` sends the event."""

    def __init__(self, store: SnapshotStore, staging_dir: Path, model_name: str = "adloop",
                 max_regression: float = 0.05, keep: int = 5,
                 signer: UpdateSigner | None = None) -> None:
        self.store = store
        self.signer = signer
        """Signs what :meth:`announce` sends; without one, ``announce`` refuses."""
        self.staging = Path(staging_dir)
        self.model_name = model_name
        self.max_regression = max_regression
        self.keep = keep
        self.protect: set[str] = set()
        """Versions :meth:`announce` never prunes (besides the one it announces)."""

    def publish(self, model: GenerativeRecommender, tok: UASIDTokenizer, version: str,
                parent: str | None, data_watermark: float,
                holdout: Callable[[GenerativeRecommender], float] | None = None,
                references: dict[str, float] | None = None,
                metrics: dict[str, float] | None = None,
                estimate: str = "holdout_value") -> Published:
        """Export, check and store ``model`` as ``version``; raise SnapshotRefusedError.

        ``holdout(model)`` and ``references`` are the guard's ``estimate`` (its name
        names the manifest metrics: ``holdout_<estimate>``)."""
        metrics = dict(metrics or {})
        key = "holdout_value" if estimate == "holdout_value" else f"holdout_{estimate}"
        cand = math.nan
        t0 = time.perf_counter()
        if not all_finite(model):
            self._refuse("nan", f"{version}: model parameters contain NaN/inf")
        stage = self.staging / version
        shutil.rmtree(stage, ignore_errors=True)
        try:
            manifest = export_snapshot(model, tok, stage, version, parent, self.model_name,
                                       metrics, extra={"data_watermark": data_watermark})
        except SnapshotError as exc:
            self._refuse("parity", str(exc))
        export_s = time.perf_counter() - t0
        EXPORT_SECONDS.observe(export_s)

        t1 = time.perf_counter()
        if not _nested_finite(manifest["parity"]["outputs"]):
            shutil.rmtree(stage, ignore_errors=True)
            self._refuse("nan", f"{version}: reference outputs contain NaN/inf")
        if holdout is not None:
            cand = holdout(model)
            manifest["metrics"][key] = cand
            refs = {k: v for k, v in (references or {}).items() if math.isfinite(v)}
            for name, v in refs.items():
                manifest["metrics"][f"{name}_{key}"] = v
            if refs and math.isfinite(cand):
                name, best = max(refs.items(), key=lambda kv: kv[1])
                floor = best - abs(best) * self.max_regression
                if cand < floor:
                    shutil.rmtree(stage, ignore_errors=True)
                    self._refuse("regression", f"{version}: {key.replace('_', ' ')} "
                                 f"{cand:.5f} < "
                                 f"{floor:.5f} ({name} {best:.5f} minus "
                                 f"{self.max_regression:.0%})")
            (stage / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":")))
        validate_s = time.perf_counter() - t1
        VALIDATE_SECONDS.observe(validate_s)

        digest = hashlib.sha256((stage / "manifest.json").read_bytes()).hexdigest()
        try:
            uri = self.store.put(stage, version)
        except OSError as exc:   # store unreachable: nothing announced, the next one retries
            shutil.rmtree(stage, ignore_errors=True)
            self._refuse("store_unavailable", f"{version}: snapshot store {self.store.root}: "
                         f"{exc}")
        shutil.rmtree(stage, ignore_errors=True)
        log.info("snapshot.stored", version=version, uri=uri, export_s=round(export_s, 3),
                 validate_s=round(validate_s, 3), guard_estimate=estimate,
                 guard_value=round(cand, 6) if math.isfinite(cand) else None)
        return Published(version, uri, digest, manifest, export_s, validate_s)

    def republish(self, source: str, tok: UASIDTokenizer, version: str,
                  data_watermark: float, extra: dict[str, Any] | None = None) -> Published:
        """Store the snapshot of version ``source`` again as ``version``: the same graphs
        (their checksums and parity evidence carry over), ``tok``'s current id table,
        ``parent`` = ``source``, ``data_watermark`` and ``republished_from`` = ``source``
        (plus ``extra``) in the manifest. Raises ``SnapshotRefusedError``
        (``store_unavailable``) when the source cannot be read or the copy stored."""
        stage = self.staging / version
        src = self.staging / f".{source}.source"
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            self.store.get(source, src)
            manifest = export_ids_update(src, tok, stage, version)
            manifest.update(data_watermark=data_watermark, republished_from=source,
                            **(extra or {}))
            (stage / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":")))
            digest = hashlib.sha256((stage / "manifest.json").read_bytes()).hexdigest()
            uri = self.store.put(stage, version)
        except (OSError, ValueError, KeyError, SnapshotError) as exc:
            self._refuse("store_unavailable", f"{version}: republishing {source} from "
                         f"{self.store.root}: {exc!r}")
        finally:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(stage, ignore_errors=True)
        log.info("snapshot.republished", version=version, source=source, uri=uri)
        return Published(version, uri, digest, manifest, 0.0, time.perf_counter() - t0)

    def _refuse(self, reason: str, detail: str) -> Any:
        REFUSED.labels(reason).inc()
        log.warning("snapshot.refused", reason=reason, detail=detail)
        raise SnapshotRefusedError(reason, detail)

    def update_event(self, pub: Published, data_watermark: float) -> ModelUpdate:
        m = pub.manifest
        return ModelUpdate(
            model_name=self.model_name, version=pub.version, parent=m.get("parent"),
            sha256=pub.manifest_sha256, uri=pub.uri, id_space_version=m["id_space_version"],
            data_watermark=data_watermark, created_time=float(m["created_time"]),
            metrics={k: float(v) for k, v in m.get("metrics", {}).items()
                     if isinstance(v, int | float) and math.isfinite(float(v))})

    def announce(self, producer: EventProducer, event: ModelUpdate) -> None:
        """Sign ``event`` and send it to ``model-updates`` (then prune the store)."""
        if self.signer is None:
            raise RuntimeError("no signing key: model-updates records are always signed "
                               "(Publisher(signer=...))")
        event = self.signer.sign(event)
        producer.send("model-updates", event)
        producer.flush(30)
        PUBLISHED.inc()
        try:
            pruned = self.store.prune(self.keep, protect={event.version, *self.protect})
        except OSError as exc:   # pruning waits for the next publish
            log.warning("snapshot.prune_failed", error=str(exc))
            pruned = []
        log.info("snapshot.published", version=event.version, key_id=event.key_id,
                 pruned=pruned)
