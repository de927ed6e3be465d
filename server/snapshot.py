"""Snapshot store access: fetch a snapshot into the local cache and verify it.

A snapshot (see ``docs/snapshot-format.md``) is ``manifest.json`` plus the ONNX files
it lists, under an fsspec URL or a plain directory: ``file://``, ``http(s)://`` (any
web server serving the store directory; fsspec's driver uses aiohttp) or ``s3://``
(needs the ``s3fs`` package, not in ``requirements.lock`` by default). A store scheme
without an installed driver is a refused snapshot (reason ``fetch``) whose detail names
the package to install. The ``model-updates`` record
carries the sha256 of ``manifest.json``; the manifest carries each file's sha256 and
size. Only ``.onnx`` and ``.json`` files with plain names are ever fetched or read;
nothing is unpickled.

Which URIs get here at all is decided before, on the signed record (:mod:`server.trust`).
Here, an http(s) store may not redirect (the record's signed URI is what is fetched) and
a local file may not be a symlink leading out of its snapshot directory.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.registry import known_implementations

from snapshot_format import (
    MAX_MANIFEST_BYTES,
    Manifest,
    SnapshotRejectedError,
    parse_manifest,
    sha256_hex,
)

HTTP_TIMEOUT_S = 120.0
"""Total time one file may take over http(s) before the snapshot is refused."""


def _open_store(uri: str) -> tuple[Any, str]:
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    options: dict[str, Any] = {}
    if scheme in ("http", "https"):
        import aiohttp  # fsspec's http driver; only stores served over http need it

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)}
        # never follow a redirect away from the announced (and vetted) URI: aiohttp
        # raises TooManyRedirects at the first one
        options["allow_redirects"] = True
        options["max_redirects"] = 1
    try:
        fs, root = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        known = known_implementations.get(scheme, {})
        hint = known.get("err") or f"no fsspec driver for {scheme}://"
        raise SnapshotRejectedError(
            "fetch", f"cannot open snapshot store {uri}: {hint} ({exc!r}); add the driver "
            f"package to requirements.lock (see docs/snapshot-format.md)") from None
    return fs, str(root).rstrip("/")


def fetch_snapshot(uri: str, manifest_sha256: str | None, cache_root: Path,
                   version: str | None = None) -> tuple[Path, Manifest]:
    """Copy a snapshot into ``cache_root/<version>`` after verifying every checksum.

    ``manifest_sha256`` (from the ``model-updates`` record) is checked against the
    manifest bytes; ``None`` skips that check (a local ``--snapshot`` directory).
    """
    fs, root = _open_store(uri)   # a scheme without a driver is refused here
    _stays_inside(fs, root, "manifest.json")
    try:
        data = fs.cat_file(f"{root}/manifest.json")
    except Exception as exc:  # OSError, ValueError, aiohttp errors, a timeout
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
            _stays_inside(fs, root, name)
            try:
                blob = fs.cat_file(f"{root}/{name}")
            except Exception as exc:  # OSError, ValueError, aiohttp errors, a timeout
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


def _stays_inside(fs: Any, root: str, name: str) -> None:
    """Refuse a local file that resolves outside its snapshot directory (a symlink)."""
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return
    real = os.path.realpath(f"{root}/{name}")
    if not real.startswith(os.path.realpath(root) + os.sep):
        raise SnapshotRejectedError("fetch", f"{name} resolves outside the snapshot "
                                    "directory (a symlink)")


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
