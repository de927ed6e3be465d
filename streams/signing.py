"""Signed ``model-updates`` records: HMAC-SHA256 under a keyring of key ids.

Whoever can write ``model-updates`` could otherwise make every server fetch any URI it
names (docs/security.md). The learner signs each record with one key of its keyring
(:func:`sign_update`); a server verifies the signature with its own keyring before it
does anything else with the record (:func:`verify_update`).

What is signed: the record's canonical bytes, :func:`canonical_bytes` — every field of
the ``ModelUpdate`` type but ``signature`` (``key_id`` and ``schema`` included),
encoded as compact JSON with sorted keys, after the domain prefix :data:`MAC_CONTEXT`.
Fields a newer writer adds are not signed, and this build ignores them.

A keyring is ``key_id:secret`` entries, one per line in a file or separated by commas in
an environment variable; ``#`` starts a comment line. Rotation: add the new key to every
server's keyring, switch the learner to it (``update_key_id``), then drop the old key.
Secrets never appear in a ``repr``, a log line or an error message.

``adloop update-keys init|add|drop|list`` manages a keyring file (:func:`run`).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
from pydantic import SecretStr

from streams.schemas import MODEL_UPDATE_SCHEMA, ModelUpdate
from streams.settings import cache_dir

MAC_CONTEXT = b"adloop model-updates hmac-sha256 v1\n"
"""Prefix of every signed message, so these MACs are never valid for anything else."""

MIN_SECRET_BYTES = 16
KEY_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")

VerifyReason = Literal["unsigned", "bad_signature", "unknown_key"]


def default_keyring_file() -> Path:
    """The keyring the learner and the server share on one host when none is configured
    (generated on first use by whichever starts first)."""
    return cache_dir() / "model-updates.keys"


class KeyringError(ValueError):
    """A keyring that cannot be used (its text never appears in the message)."""


@dataclass(frozen=True)
class Keyring:
    """Key id -> secret, in the order given. ``repr`` shows the ids only."""

    keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    source: str = ""

    @property
    def ids(self) -> list[str]:
        return list(self.keys)

    def __repr__(self) -> str:
        return f"Keyring(ids={self.ids}, source={self.source!r})"

    def signing_key(self, key_id: str | None = None) -> tuple[str, bytes]:
        """The key to sign with: ``key_id``, or the last one listed when None."""
        if not self.keys:
            raise KeyringError(f"keyring {self.source or '(empty)'} has no keys")
        if key_id is None or key_id == "":
            key_id = self.ids[-1]
        if key_id not in self.keys:
            raise KeyringError(f"signing key id {key_id!r} is not in keyring {self.source} "
                               f"(ids: {', '.join(self.ids)})")
        return key_id, self.keys[key_id]


def parse_keyring(text: str, source: str = "") -> Keyring:
    """``id:secret`` entries separated by newlines or commas (``#`` comment lines)."""
    keys: dict[str, bytes] = {}
    entries = [e.strip() for line in text.splitlines()
               if not line.strip().startswith("#") for e in line.split(",")]
    for n, entry in enumerate((e for e in entries if e), 1):
        key_id, sep, secret = entry.partition(":")
        key_id, secret = key_id.strip(), secret.strip()
        if not sep or not KEY_ID.match(key_id):
            raise KeyringError(f"keyring {source}: entry {n} is not 'key_id:secret' with a "
                               "key id of letters, digits, '.', '_' or '-' (at most 64)")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise KeyringError(f"keyring {source}: the secret of key {key_id!r} is shorter "
                               f"than {MIN_SECRET_BYTES} bytes")
        if key_id in keys:
            raise KeyringError(f"keyring {source}: key id {key_id!r} appears twice")
        keys[key_id] = secret.encode()
    if not keys:
        raise KeyringError(f"keyring {source or '(empty)'} has no keys")
    return Keyring(keys, source)


def read_keyring_file(path: Path) -> Keyring:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"cannot read keyring file {path}: "
                           f"{exc.strerror if isinstance(exc, OSError) else 'not UTF-8'}"
                           ) from None
    return parse_keyring(text, str(path))


def generate_keyring_file(path: Path, key_id: str = "k1") -> Keyring:
    """The keyring in ``path``; if there is none, first write one with a fresh random key
    (mode 0600, created exclusively, so processes racing to create it read the same)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write("# model-updates signing keys (key_id:secret), generated by adloop\n"
                        f"{key_id}:{secrets.token_hex(32)}\n")
    return read_keyring_file(path)


def load_keyring(keys: SecretStr | None, keys_file: Path | None,
                 default_file: Path | None) -> Keyring:
    """A process's keyring: ``keys`` (an environment secret) if set, else ``keys_file``,
    else ``default_file`` (generated on first use, for the embedded stack on one host)."""
    if keys is not None and keys.get_secret_value().strip():
        return parse_keyring(keys.get_secret_value(), "the update_keys setting")
    if keys_file is not None:
        return read_keyring_file(keys_file)
    if default_file is None:
        raise KeyringError("no model-updates keyring configured (update_keys or "
                           "update_keys_file)")
    return generate_keyring_file(default_file)


_encoder = msgspec.json.Encoder(order="sorted")


def canonical_bytes(update: ModelUpdate) -> bytes:
    """What the signature covers: every field but ``signature``, compact JSON, sorted
    keys (floats as msgspec writes them, which round-trip exactly)."""
    fields = msgspec.to_builtins(update)
    fields.pop("signature", None)
    return _encoder.encode(fields)


def _mac(secret: bytes, update: ModelUpdate) -> str:
    return hmac.new(secret, MAC_CONTEXT + canonical_bytes(update), hashlib.sha256).hexdigest()


def sign_update(update: ModelUpdate, key_id: str, secret: bytes) -> ModelUpdate:
    """A copy of ``update`` at the current schema, carrying ``key_id`` and its signature."""
    unsigned = msgspec.structs.replace(update, schema=MODEL_UPDATE_SCHEMA, key_id=key_id,
                                       signature="")
    return msgspec.structs.replace(unsigned, signature=_mac(secret, unsigned))


@dataclass(frozen=True)
class Refusal:
    reason: VerifyReason
    detail: str


def verify_update(update: ModelUpdate, keyring: Keyring) -> Refusal | None:
    """None when ``update`` is signed by a key of ``keyring``; otherwise why not."""
    if update.schema < MODEL_UPDATE_SCHEMA:
        return Refusal("unsigned", f"schema {update.schema} record (written before "
                       "model-updates were signed); republish it from the learner")
    if not update.signature or not update.key_id:
        return Refusal("unsigned", "the record has no signature or no key_id")
    secret = keyring.keys.get(update.key_id)
    if secret is None:
        return Refusal("unknown_key", f"key id {update.key_id[:64]!r} is not in this "
                       f"reader's keyring (ids: {', '.join(keyring.ids) or 'none'})")
    if not hmac.compare_digest(_mac(secret, update).encode(),
                               update.signature.lower().encode("ascii", "replace")):
        return Refusal("bad_signature", f"the signature does not verify under key "
                       f"{update.key_id!r} (the record was changed or signed with "
                       "another secret)")
    return None


# -- ``adloop update-keys``: keyring files for deployments ---------------------------------
def _write_keyring(path: Path, keys: Mapping[str, bytes]) -> None:
    """Replace ``path`` atomically with ``keys`` (mode 0600)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# model-updates signing keys (key_id:secret), written by adloop\n")
        f.writelines(f"{k}:{v.decode()}\n" for k, v in keys.items())
    os.replace(tmp, path)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("init", "add", "drop", "list"),
                        help="init: create the file with one random key unless it exists; "
                        "add: append a new random key (a rotation's first step); drop: "
                        "remove a key (its last step); list: print the key ids")
    parser.add_argument("--file", type=Path, default=None,
                        help="keyring file (default: ADLOOP_UPDATE_KEYS_FILE, else "
                        "<cache>/model-updates.keys)")
    parser.add_argument("--key-id", default=None, help="key id for init, add and drop")


def run(args: argparse.Namespace) -> int:
    """Secrets are written to the file only; what is printed is key ids."""
    path = Path(args.file or os.environ.get("ADLOOP_UPDATE_KEYS_FILE")
                or default_keyring_file())
    try:
        if args.action == "init":
            ring = generate_keyring_file(path, args.key_id or "k1")
        else:
            ring = read_keyring_file(path)
            keys = dict(ring.keys)
            if args.action in ("add", "drop") and not args.key_id:
                raise KeyringError(f"update-keys {args.action} needs --key-id")
            if args.action == "add":
                if args.key_id in keys or not KEY_ID.match(args.key_id):
                    raise KeyringError(f"key id {args.key_id!r} exists or is not a plain id")
                keys[args.key_id] = secrets.token_hex(32).encode()
            elif args.action == "drop":
                if args.key_id not in keys or len(keys) == 1:
                    raise KeyringError(f"cannot drop {args.key_id!r}: not in the keyring, "
                                       "or its only key")
                del keys[args.key_id]
            if args.action != "list":
                _write_keyring(path, keys)
                ring = read_keyring_file(path)
    except KeyringError as exc:
        print(f"adloop update-keys: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: {', '.join(ring.ids)}")
    return 0
