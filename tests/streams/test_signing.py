"""Signing ``model-updates`` records: what verifies, what does not, and the keyring rules."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pydantic import SecretStr

from streams.schemas import MODEL_UPDATE_SCHEMA, ModelUpdate, decode, encode
from streams.signing import (
    KeyringError,
    canonical_bytes,
    generate_keyring_file,
    load_keyring,
    parse_keyring,
    sign_update,
    verify_update,
)

SECRET_A = b"first-secret-of-at-least-16-bytes"
SECRET_B = b"second-secret-of-at-least-16-bytes"
KEYRING = parse_keyring(f"a:{SECRET_A.decode()}\nb:{SECRET_B.decode()}")


def _update(**overrides: Any) -> ModelUpdate:
    fields: dict[str, Any] = dict(
        model_name="adloop", version="v000002", parent="v000001", sha256="ab" * 32,
        uri="file:///var/lib/adloop/snapshots/v000002", id_space_version="ids-1",
        data_watermark=1234.5, created_time=1700000000.25,
        metrics={"holdout_value": 0.125, "updates": 50.0})
    fields.update(overrides)
    return ModelUpdate(**fields)


def _verdict(update: ModelUpdate) -> str | None:
    refusal = verify_update(update, KEYRING)
    return None if refusal is None else refusal.reason


def test_a_signed_record_verifies_after_the_wire_round_trip() -> None:
    signed = sign_update(_update(), "a", SECRET_A)
    assert signed.schema == MODEL_UPDATE_SCHEMA and signed.key_id == "a"
    assert len(signed.signature) == 64
    back = decode(encode(signed), ModelUpdate)
    assert isinstance(back, ModelUpdate)
    assert _verdict(back) is None
    assert _verdict(sign_update(_update(), "b", SECRET_B)) is None   # either key of the ring


CHANGES: dict[str, Any] = {
    "model_name": "other", "version": "v000003", "parent": None, "sha256": "cd" * 32,
    "uri": "http://169.254.169.254/latest", "id_space_version": "ids-2",
    "data_watermark": 1234.50001, "created_time": 1700000001.0,
    "metrics": {"holdout_value": 0.126, "updates": 50.0},
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_changing_any_signed_field_breaks_the_signature(name: str) -> None:
    signed = sign_update(_update(), "a", SECRET_A)
    tampered = msgspec.structs.replace(signed, **{name: CHANGES[name]})
    assert _verdict(tampered) == "bad_signature"


def test_a_metric_added_or_the_key_id_swapped_breaks_the_signature() -> None:
    signed = sign_update(_update(), "a", SECRET_A)
    extra = msgspec.structs.replace(signed, metrics={**signed.metrics, "x": 1.0})
    assert _verdict(extra) == "bad_signature"
    # the key id is signed: relabelling a record as another key's does not verify
    assert _verdict(msgspec.structs.replace(signed, key_id="b")) == "bad_signature"
    assert _verdict(msgspec.structs.replace(signed, signature="0" * 64)) == "bad_signature"
    assert _verdict(msgspec.structs.replace(signed, signature="not hex ✓")) == "bad_signature"


def test_a_wrong_secret_an_unknown_key_id_and_no_signature_are_told_apart() -> None:
    assert _verdict(sign_update(_update(), "a", SECRET_B)) == "bad_signature"
    refusal = verify_update(sign_update(_update(), "c", SECRET_A), KEYRING)
    assert refusal is not None and refusal.reason == "unknown_key"
    assert "'c'" in refusal.detail and "a, b" in refusal.detail
    assert _verdict(_update()) == "unsigned"
    assert _verdict(_update(key_id="a")) == "unsigned"


def test_a_schema_1_record_still_decodes_and_is_refused_as_unsigned() -> None:
    old = msgspec.to_builtins(_update())
    old["schema"] = 1
    del old["key_id"], old["signature"]
    rec = decode(msgspec.json.encode(old), ModelUpdate)
    assert isinstance(rec, ModelUpdate) and rec.schema == 1
    refusal = verify_update(rec, KEYRING)
    assert refusal is not None and refusal.reason == "unsigned"
    assert "schema 1" in refusal.detail
    # ... and a schema-1 record with a copied signature is still refused
    forged = msgspec.structs.replace(sign_update(_update(), "a", SECRET_A), schema=1)
    assert _verdict(forged) == "unsigned"


def test_the_canonical_bytes_leave_out_the_signature_and_sort_keys() -> None:
    signed = sign_update(_update(), "a", SECRET_A)
    raw = canonical_bytes(signed)
    assert b"signature" not in raw and b'"key_id":"a"' in raw
    keys = list(msgspec.json.decode(raw))
    assert keys == sorted(keys)
    assert canonical_bytes(signed) == canonical_bytes(
        msgspec.structs.replace(signed, signature="anything"))


def test_keyrings_parse_from_lines_or_commas_and_never_show_a_secret(tmp_path: Path) -> None:
    ring = parse_keyring("# comment\nold:0123456789abcdef0123\n\nnew:fedcba9876543210fedc\n")
    assert ring.ids == ["old", "new"] and ring.signing_key() == ("new",
                                                                 b"fedcba9876543210fedc")
    assert ring.signing_key("old")[0] == "old"
    assert parse_keyring("x:0123456789abcdef0123,y:0123456789abcdef0124").ids == ["x", "y"]
    assert "0123456789abcdef" not in repr(ring)
    for bad in ("", "nocolon0123456789abcdef", "k:short", "bad id:0123456789abcdef0123",
                "k:0123456789abcdef0123,k:0123456789abcdef0124"):
        with pytest.raises(KeyringError) as err:
            parse_keyring(bad, "test")
        assert "0123456789abcdef" not in str(err.value)
    with pytest.raises(KeyringError, match="'z' is not in keyring"):
        ring.signing_key("z")


def test_the_default_keyring_file_is_generated_once_private(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "model-updates.keys"
    first = load_keyring(None, None, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert generate_keyring_file(path).keys == first.keys     # read, not replaced
    assert len(first.ids) == 1 and len(first.keys[first.ids[0]]) == 64
    # an explicit secret wins over files; an explicit file over the default
    explicit = load_keyring(SecretStr("e:0123456789abcdef0123"), path, path)
    assert explicit.ids == ["e"]
    other = tmp_path / "other.keys"
    other.write_text("o:0123456789abcdef0123\n")
    assert load_keyring(None, other, path).ids == ["o"]
    with pytest.raises(KeyringError, match="cannot read keyring file"):
        load_keyring(None, tmp_path / "missing.keys", path)


def test_update_keys_command_rotates_a_keyring_file_and_prints_ids_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adloop.cli import main

    path = tmp_path / "keys"
    assert main(["update-keys", "init", "--file", str(path)]) == 0
    assert main(["update-keys", "add", "--file", str(path), "--key-id", "k2"]) == 0
    ring = load_keyring(None, path, None)
    assert ring.ids == ["k1", "k2"] and ring.signing_key()[0] == "k2"
    assert main(["update-keys", "drop", "--file", str(path), "--key-id", "k1"]) == 0
    assert load_keyring(None, path, None).keys == {"k2": ring.keys["k2"]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["update-keys", "drop", "--file", str(path), "--key-id", "k2"]) == 2
    out = capsys.readouterr()
    assert "k2" in out.out and "only key" in out.err
    assert ring.keys["k2"].decode() not in out.out + out.err
