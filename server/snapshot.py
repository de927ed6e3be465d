"""Snapshot store access: fetch a snapshot into the local cache and verify it.

A snapshot (see ``docs/snapshot-format.md``) is ``manifest.json`` plus the ONNX files
it lists, under an fsspec URL or a plain directory. The ``model-updates`` record
carries the sha256 of ``manifest.json``; the manifest carries each file's sha256 and
size. Only ``.onnx`` and ``.json`` files with plain names are ever fetched or read;
nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

REQUIRED_FILES = ("encoder.onnx", "decoder_step.onnx", "value.onnx")
FORMAT = 2
"""The snapshot format this server reads (docs/snapshot-format.md). Format 1 (per-beam
``memory`` into ``decoder_step.onnx``) is refused: re-export such a checkpoint."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*\.(onnx|json)$")
MAX_MANIFEST_BYTES = 512 * 1024 * 1024


class SnapshotRejectedError(Exception):
    """A snapshot that must not be served; ``step`` names where it failed
    (fetch, checksum, manifest, load, warmup, nan, parity)."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The parts of ``manifest.json`` the server uses (``raw`` keeps everything)."""

    version: str
    model_name: str
    parent: str | None
    id_space_version: str
    level_sizes: tuple[int, ...]
    history_len: int
    context_features: tuple[str, ...]
    context_buckets: int
    files: dict[str, dict[str, Any]]
    ad_ids: list[str]
    ids: np.ndarray            # [n, T] int64, rows in ``ad_ids`` order
    parity: dict[str, Any]
    raw: dict[str, Any]

    @property
    def id_len(self) -> int:
        return len(self.level_sizes)


def parse_manifest(data: bytes) -> Manifest:
    """Validate and parse ``manifest.json`` bytes (raises :class:`SnapshotRejectedError`)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotRejectedError("manifest", f"manifest.json is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SnapshotRejectedError("manifest", "manifest.json is not an object")
    try:
        if raw.get("format") != FORMAT:
            raise ValueError(f"snapshot format {raw.get('format')!r} not supported: this "
                             f"server reads format {FORMAT} only (re-export the checkpoint "
                             "with this version's adloop export)")
        level_sizes = tuple(int(s) for s in raw["level_sizes"])
        if not level_sizes or min(level_sizes) < 1:
            raise ValueError("level_sizes must be a non-empty list of sizes >= 1")
        files = raw["files"]
        if not isinstance(files, dict):
            raise ValueError("files must be an object")
        for name, meta in files.items():
            if not _SAFE_NAME.match(name) or name == "manifest.json":
                raise ValueError(f"file name {name!r} not allowed (plain .onnx/.json only)")
            if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
                raise ValueError(f"files[{name!r}] needs a sha256")
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise ValueError(f"files misses {missing}")
        id_table = raw["ids"]
        if not isinstance(id_table, dict):
            raise ValueError("ids must be an object ad id -> id")
        ad_ids = list(id_table)
        T = len(level_sizes)
        ids = np.array([id_table[a] for a in ad_ids], dtype=np.int64).reshape(len(ad_ids), T) \
            if ad_ids else np.zeros((0, T), dtype=np.int64)
        if ad_ids and ((ids < 0).any() or (ids >= np.array(level_sizes)).any()):
            raise ValueError("an id has a code outside its level's size")
        return Manifest(
            version=str(raw["version"]), model_name=str(raw.get("model_name", "")),
            parent=raw.get("parent"), id_space_version=str(raw.get("id_space_version", "")),
            level_sizes=level_sizes, history_len=int(raw["history_len"]),
            context_features=tuple(str(f) for f in raw["context_features"]),
            context_buckets=int(raw["context_buckets"]), files=files, ad_ids=ad_ids, ids=ids,
            parity=raw.get("parity") or {}, raw=raw)
    except SnapshotRejectedError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotRejectedError("manifest", f"manifest.json: {exc!r}") from None


def _open_store(uri: str) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs, str(root).rstrip("/")


def fetch_snapshot(uri: str, manifest_sha256: str | None, cache_root: Path,
                   version: str | None = None) -> tuple[Path, Manifest]:
    """Copy a snapshot into ``cache_root/<version>`` after verifying every checksum.

    ``manifest_sha256`` (from the ``model-updates`` record) is checked against the
    manifest bytes; ``None`` skips that check (a local ``--snapshot`` directory).
    """
    try:
        fs, root = _open_store(uri)
        data = fs.cat_file(f"{root}/manifest.json")
    except (OSError, ValueError) as exc:
        raise SnapshotRejectedError("fetch", f"cannot read {uri}/manifest.json: {exc!r}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise SnapshotRejectedError("manifest", f"manifest.json is {len(data)} bytes")
    got = sha256_hex(data)
    if manifest_sha256 is not None and got != manifest_sha256.lower():
        raise SnapshotRejectedError("checksum", f"manifest.json sha256 {got} != expected "
                               f"{manifest_sha256}")
    manifest = parse_manifest(data)
    if version is not None and manifest.version != version:
        raise SnapshotRejectedError("manifest", f"manifest version {manifest.version!r} != "
                               f"model-updates version {version!r}")
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / _safe_dir(manifest.version)
    tmp = cache_root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, meta in manifest.files.items():
            try:
                blob = fs.cat_file(f"{root}/{name}")
            except (OSError, ValueError) as exc:
                raise SnapshotRejectedError("fetch", f"cannot read {name}: {exc!r}") from None
            digest = sha256_hex(blob)
            if digest != str(meta["sha256"]).lower():
                raise SnapshotRejectedError("checksum", f"{name} sha256 {digest} != manifest "
                                       f"{meta['sha256']}")
            if "bytes" in meta and int(meta["bytes"]) != len(blob):
                raise SnapshotRejectedError("checksum", f"{name} is {len(blob)} bytes, manifest "
                                       f"says {meta['bytes']}")
            (tmp / name).write_bytes(blob)
        (tmp / "manifest.json").write_bytes(data)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final, manifest


def verify_local(directory: Path, manifest_sha256: str | None = None) -> Manifest:
    """Re-verify a cached snapshot directory in place (used before a rollback)."""
    data = (directory / "manifest.json").read_bytes()
    if manifest_sha256 is not None and sha256_hex(data) != manifest_sha256.lower():
        raise SnapshotRejectedError("checksum", "cached manifest.json changed")
    manifest = parse_manifest(data)
    for name, meta in manifest.files.items():
        if sha256_hex((directory / name).read_bytes()) != str(meta["sha256"]).lower():
            raise SnapshotRejectedError("checksum", f"cached {name} changed")
    return manifest


def _safe_dir(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", version)[:200] or "_"
