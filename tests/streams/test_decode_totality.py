"""decode() is total: every byte string gets the record or a DecodeFailure with a reason.

One property test per topic record type, over arbitrary bytes, arbitrary JSON values and
mutations of valid encoded records. They run deterministically under the default
hypothesis profile (tests/conftest.py) and with random seeds under ``./dev fuzz``.
The table test pins the reason of every byte class docs/reliability.md lists.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from streams.samples import sample_records
from streams.schemas import (
    DEFAULT_MAX_RECORD_BYTES,
    DLQ_REASONS,
    Click,
    DecodeFailure,
    Event,
    decode,
    encode,
)
from streams.topics import TOPICS

TOPIC_NAMES = sorted(TOPICS)
SAMPLES = {t: [encode(r) for r in recs] for t, recs in sample_records(3).items()}


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_total(raw: bytes | None, record_type: type[Event]) -> Event | DecodeFailure:
    """The property: no exception, and either an exact round trip or a known reason."""
    result = decode(raw, record_type)
    if isinstance(result, DecodeFailure):
        assert result.reason in DLQ_REASONS, result
        assert result.detail
        if raw is not None and not _is_utf8(raw):
            assert result.reason in ("not_json", "oversized"), result
    else:
        assert isinstance(result, record_type)
        assert result.schema in record_type.SCHEMAS_READ
        assert raw is not None and _is_utf8(raw)
        assert decode(encode(result), record_type) == result
    return result


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)

_NASTY_FRAGMENTS = [
    b"\x80", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b"NaN",
    b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"9" * 40, b'"\\ud800"', b"[" * 2000,
    b"{" * 2000, b'{"schema":2}', b"null", b'""', b"[]", b"{}", b",", b'"', b"\\",
]


@st.composite
def mutated_records(draw: st.DrawFn, topic: str) -> bytes:
    """A valid encoded record of ``topic`` with byte-level or JSON-level damage."""
    raw = bytearray(draw(st.sampled_from(SAMPLES[topic])))
    how = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice", "field",
                                "duplicate_key"]))
    note(f"mutation={how}")
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
    elif how == "insert":
        i = draw(st.integers(0, len(raw)))
        raw[i:i] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(_NASTY_FRAGMENTS))
    elif how == "delete":
        i = draw(st.integers(0, len(raw) - 1))
        del raw[i:i + draw(st.integers(1, 16))]
    elif how == "truncate":
        del raw[draw(st.integers(0, len(raw) - 1)):]
    elif how == "splice":  # replace a value-looking span with a nasty fragment
        i = draw(st.integers(0, len(raw) - 1))
        raw[i:i + draw(st.integers(0, 12))] = draw(st.sampled_from(_NASTY_FRAGMENTS))
    else:
        obj = msgspec.json.decode(bytes(raw))
        field = draw(st.sampled_from(sorted(obj)))
        if how == "field":
            obj[field] = draw(json_values)
            raw = bytearray(msgspec.json.encode(obj))
        else:  # the same key twice: msgspec keeps the last value
            extra = msgspec.json.encode({field: draw(json_values)})
            raw = bytearray(bytes(raw[:-1]) + b"," + extra[1:])
    return bytes(raw)


@pytest.mark.parametrize("topic", TOPIC_NAMES)
@given(data=st.data())
def test_decode_is_total_on_arbitrary_bytes(topic: str, data: st.DataObject) -> None:
    raw = data.draw(st.binary(max_size=600) | st.sampled_from(_NASTY_FRAGMENTS), label="raw")
    check_total(raw, TOPICS[topic].record)


@pytest.mark.parametrize("topic", TOPIC_NAMES)
@given(data=st.data())
def test_decode_is_total_on_arbitrary_json_values(topic: str, data: st.DataObject) -> None:
    value = data.draw(json_values | st.dictionaries(st.text(max_size=12), json_values,
                                                    max_size=8), label="value")
    check_total(msgspec.json.encode(value), TOPICS[topic].record)


@pytest.mark.parametrize("topic", TOPIC_NAMES)
@given(data=st.data())
def test_decode_is_total_on_mutated_records(topic: str, data: st.DataObject) -> None:
    raw = data.draw(mutated_records(topic), label="raw")
    check_total(raw, TOPICS[topic].record)


_CLICK = SAMPLES["clicks"][0]
_DEEP = b"[" * 100_000


def _with(field_bytes: bytes) -> bytes:
    """The sample click with one more member (raw JSON bytes) before the closing brace."""
    return _CLICK[:-1] + b"," + field_bytes + b"}"


BYTE_CLASSES: list[tuple[str, bytes | None, str]] = [
    ("non-UTF-8 top-level string", b'"\x80"', "not_json"),
    ("non-UTF-8 object key", b'{"\x80":1}', "not_json"),
    ("non-UTF-8 in a known field", _CLICK.replace(b'"u1"', b'"u\xff"'), "not_json"),
    ("non-UTF-8 in an unknown field", _with(b'"x":"\xc3"'), "not_json"),
    ("non-UTF-8 after a wrong-shape prefix", b'{"schema":1,"x":"\x80"', "not_json"),
    ("UTF-8 byte-order mark", b"\xef\xbb\xbf" + _CLICK, "not_json"),
    ("lone surrogate escape", _with(b'"x":"\\ud800"'), "not_json"),
    ("100000 nested arrays", _DEEP, "not_json"),
    ("deep nesting in an unknown field", _with(b'"x":' + _DEEP), "not_json"),
    ("deep nesting in the schema field", b'{"schema":' + _DEEP, "not_json"),
    ("NaN literal", _CLICK.replace(b'"event_time":', b'"event_time":NaN,"y":'), "not_json"),
    ("Infinity literal", _with(b'"x":Infinity'), "not_json"),
    ("trailing bytes", _CLICK + b" x", "not_json"),
    ("empty value", b"", "not_json"),
    ("truncated record", _CLICK[:-5], "not_json"),
    ("float out of range", _CLICK.replace(b'"event_time":', b'"event_time":1e400,"y":'),
     "invalid"),
    ("huge integer for a float field", _with(b'"event_time":' + b"9" * 400), "invalid"),
    ("huge integer schema version", b'{"schema":' + b"9" * 60 + b"}", "schema_version"),
    ("another schema version", _CLICK.replace(b'"schema":1', b'"schema":2'), "schema_version"),
    ("tombstone (null value)", None, "invalid"),
    ("JSON null", b"null", "invalid"),
    ("JSON array", b"[1,2]", "invalid"),
    ("missing field", b'{"schema":1}', "invalid"),
    ("wrong type", _CLICK.replace(b'"u1"', b"7"), "invalid"),
    ("oversized", b" " * (DEFAULT_MAX_RECORD_BYTES + 1), "oversized"),
]


@pytest.mark.parametrize(("raw", "reason"), [(r, why) for _, r, why in BYTE_CLASSES],
                         ids=[name for name, _, _ in BYTE_CLASSES])
def test_each_byte_class_gets_its_reason(raw: bytes | None, reason: str) -> None:
    result = decode(raw, Click)
    assert isinstance(result, DecodeFailure), result
    assert result.reason == reason, result
    assert result.detail


def test_a_duplicate_key_keeps_the_last_value() -> None:
    result = decode(_with(b'"event_time":42.0'), Click)
    assert isinstance(result, Click) and result.event_time == 42.0


def test_unknown_fields_are_ignored_when_well_formed() -> None:
    result = decode(_with(b'"future_field":{"a":[1,2,"\xc3\xa9"]}'), Click)
    assert isinstance(result, Click)


@pytest.mark.parametrize("topic", TOPIC_NAMES)
@pytest.mark.parametrize("field_value", [None, True, 1, -1, 1.5, "s", [], {}, [[1]], 2**70])
def test_a_wrong_type_at_every_field_is_invalid_or_accepted(topic: str,
                                                            field_value: object) -> None:
    for raw in SAMPLES[topic]:
        obj = msgspec.json.decode(raw)
        for field in obj:
            mutated = dict(obj, **{field: field_value})
            result = check_total(msgspec.json.encode(mutated), TOPICS[topic].record)
            if isinstance(result, DecodeFailure):
                assert result.reason in ("invalid", "schema_version"), (field, result)
