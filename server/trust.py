"""Which ``model-updates`` records the server acts on, decided before anything is fetched.

:class:`UpdateGate` runs on every decoded record, in this order:

1. the signature verifies under the server's keyring (:func:`streams.signing.verify_update`:
   ``unsigned``, ``unknown_key``, ``bad_signature``);
2. the record's snapshot URI lies under one of the configured snapshot bases
   (:class:`SnapshotBases`: ``uri_outside_bases``).

A refused record is counted in ``adloop_server_model_updates_refused_total{reason}``,
dead-lettered by the follower with the reason, and never fetched.

Bases are compared on the parsed URI, never as string prefixes: ``file://`` bases (or
plain paths) by the real path of the snapshot directory (symlinks and ``..`` resolved,
which must stay inside the base's real path), ``http(s)://`` and ``s3://`` bases by
scheme, host, port and whole path segments (no ``.``/``..`` segments, no user info,
query or fragment). A URI holding ``::`` (an fsspec chain) is never allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.metrics import UPDATES_REFUSED
from streams.schemas import DlqReason, ModelUpdate
from streams.signing import Keyring, verify_update

REMOTE_SCHEMES = ("http", "https", "s3")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class BaseError(ValueError):
    """A snapshot base that cannot be used (bad setting)."""


@dataclass(frozen=True)
class _Remote:
    scheme: str
    host: str
    port: int | None
    segments: tuple[str, ...]

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.scheme}://{self.host}{port}/{'/'.join(self.segments)}"


def _segments(path: str, what: str) -> tuple[str, ...]:
    out = []
    for raw in path.split("/"):
        seg = unquote(raw)
        if not seg:
            continue
        if seg in (".", "..") or "/" in seg or "\\" in seg or "\x00" in seg:
            raise BaseError(f"{what} has a path segment {raw!r} that is not a plain name")
        out.append(seg)
    return tuple(out)


def _remote(uri: str, what: str) -> _Remote:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if parts.username is not None or parts.password is not None:
        raise BaseError(f"{what} carries user info")
    if parts.query or parts.fragment:
        raise BaseError(f"{what} has a query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise BaseError(f"{what} has an invalid port") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise BaseError(f"{what} has no host")
    return _Remote(scheme, host, port if port is not None else _DEFAULT_PORTS.get(scheme),
                   _segments(parts.path, what))


def _local_path(uri: str, what: str) -> Path:
    """The path of a ``file://`` URI or a plain path (relative: to the working dir)."""
    if "://" not in uri:
        path = uri
    else:
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise BaseError(f"{what} names a host ({parts.netloc!r}) in a file URI")
        if parts.query or parts.fragment:
            raise BaseError(f"{what} has a query or fragment")
        path = unquote(parts.path)
    if "\x00" in path:
        raise BaseError(f"{what} holds a NUL byte")
    if any(seg == ".." for seg in path.replace("\\", "/").split("/")):
        raise BaseError(f"{what} has a '..' path segment")
    return Path(path)


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


class SnapshotBases:
    """The prefixes snapshots may be fetched from (``--snapshot-bases``)."""

    def __init__(self, bases: list[str]) -> None:
        self.local: list[Path] = []
        self.remote: list[_Remote] = []
        for base in bases:
            base = base.strip()
            if not base:
                continue
            if "::" in base:
                raise BaseError(f"snapshot base {base!r} is an fsspec chain (holds '::')")
            scheme = _scheme(base)
            if scheme == "file":
                self.local.append(_local_path(base, f"snapshot base {base!r}"))
            elif scheme in REMOTE_SCHEMES:
                self.remote.append(_remote(base, f"snapshot base {base!r}"))
            else:
                raise BaseError(f"snapshot base {base!r}: scheme {scheme}:// is not one of "
                                f"file, {', '.join(REMOTE_SCHEMES)}")
        if not self.local and not self.remote:
            raise BaseError("no snapshot bases configured: the server would fetch nothing")

    @classmethod
    def parse(cls, text: str) -> SnapshotBases:
        return cls([b for b in text.split(",") if b.strip()])

    def describe(self) -> list[str]:
        return [*(p.as_posix() for p in self.local), *(str(r) for r in self.remote)]

    def refusal(self, uri: str) -> str | None:
        """None when ``uri`` is under a base; otherwise why it is not."""
        shown = uri[:300]
        if "::" in uri:
            return f"snapshot URI {shown!r} is an fsspec chain (holds '::')"
        scheme = _scheme(uri)
        try:
            if scheme == "file":
                return self._local_refusal(uri, shown)
            if scheme in REMOTE_SCHEMES:
                return self._remote_refusal(uri, shown)
        except BaseError as exc:
            return str(exc)
        return f"snapshot URI {shown!r}: scheme {scheme}:// is not allowed"

    def _local_refusal(self, uri: str, shown: str) -> str | None:
        path = _local_path(uri, f"snapshot URI {shown!r}")
        if not path.is_absolute():
            return f"snapshot URI {shown!r} is not an absolute path"
        real = Path(os.path.realpath(path))
        for base in self.local:
            if real.is_relative_to(Path(os.path.realpath(base))):
                return None
        return (f"snapshot URI {shown!r} (real path {str(real)[:300]}) is not under a "
                f"snapshot base ({', '.join(self.describe())})")

    def _remote_refusal(self, uri: str, shown: str) -> str | None:
        target = _remote(uri, f"snapshot URI {shown!r}")
        for base in self.remote:
            if (base.scheme, base.host, base.port) == (target.scheme, target.host,
                                                       target.port) \
                    and target.segments[:len(base.segments)] == base.segments:
                return None
        return (f"snapshot URI {shown!r} is not under a snapshot base "
                f"({', '.join(self.describe())})")


class UpdateGate:
    """Signature first, then the snapshot bases (see the module docstring)."""

    def __init__(self, keyring: Keyring, bases: SnapshotBases) -> None:
        self.keyring = keyring
        self.bases = bases

    def check(self, update: ModelUpdate) -> tuple[DlqReason, str] | None:
        """None for a record the server may act on; else (reason, detail), counted."""
        refusal = verify_update(update, self.keyring)
        if refusal is not None:
            return self._refuse(refusal.reason, update, refusal.detail)
        outside = self.bases.refusal(update.uri)
        if outside is not None:
            return self._refuse("uri_outside_bases", update, outside)
        return None

    @staticmethod
    def _refuse(reason: DlqReason, update: ModelUpdate, detail: str
                ) -> tuple[DlqReason, str]:
        UPDATES_REFUSED.labels(reason).inc()
        return reason, f"model update {update.version[:80]!r}: {detail}"
