"""The learner's snapshot store: written as a directory, announced at a public base URL
that a stock web server (nginx on loopback) serves, so readers need no shared volume."""

from __future__ import annotations

import hashlib
from pathlib import Path

import fsspec

from learner.publish import SnapshotStore
from tests.support.webserver import serve_directory


def _stage(directory: Path) -> dict[str, bytes]:
    directory.mkdir(parents=True)
    files = {"encoder.onnx": b"\x08\x07" * 500, "manifest.json": b'{"version":"v0001"}'}
    for name, blob in files.items():
        (directory / name).write_bytes(blob)
    return files


def test_without_a_base_url_the_announced_uri_is_the_written_directory(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "store"))
    _stage(tmp_path / "stage")
    uri = store.put(tmp_path / "stage", "v0001")
    assert uri == (tmp_path / "store" / "v0001").resolve().as_uri()


def test_with_a_base_url_the_announced_uri_is_served_over_http_byte_for_byte(
        tmp_path: Path) -> None:
    with serve_directory(tmp_path / "store", tmp_path / "nginx") as base:
        store = SnapshotStore(str(tmp_path / "store"), public_base_url=base + "/")
        files = _stage(tmp_path / "stage")
        uri = store.put(tmp_path / "stage", "v0001")
        assert uri == f"{base}/v0001" and store.uri("v0001") == uri
        fs, root = fsspec.core.url_to_fs(uri)
        for name, blob in files.items():
            got = fs.cat_file(f"{root}/{name}")
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(blob).hexdigest()
        assert store.versions() == ["v0001"]
