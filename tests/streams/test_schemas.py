"""Event decoders: exact round trips, and a reason (never an exception) for bad bytes."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.samples import sample_records
from streams.schemas import (
    DLQ_REASONS,
    SCHEMA_VERSION,
    DecodeFailure,
    Event,
    decode,
    encode,
    json_schema,
)
from streams.topics import TOPICS

RECORD_TYPES = sorted({spec.record for spec in TOPICS.values()}, key=lambda t: t.__name__)


@pytest.mark.parametrize("topic", sorted(TOPICS))
def test_every_record_type_round_trips_exactly(topic: str) -> None:
    for rec in sample_records(3)[topic]:
        raw = encode(rec)
        assert msgspec.json.decode(raw)["schema"] == SCHEMA_VERSION
        back = decode(raw, TOPICS[topic].record)
        assert back == rec


@pytest.mark.parametrize("record_type", RECORD_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=400))
def test_decoders_never_raise_on_arbitrary_bytes(record_type: type[Event], raw: bytes) -> None:
    result = decode(raw, record_type)
    assert isinstance(result, DecodeFailure | record_type)
    if isinstance(result, DecodeFailure):
        assert result.reason in DLQ_REASONS and result.detail


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("topic", sorted(TOPICS))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_decoders_reject_mutated_json_with_a_reason(topic: str, data: st.DataObject) -> None:
    good = msgspec.to_builtins(sample_records(1)[topic][0])
    field = data.draw(st.sampled_from(sorted(good)))
    mutated = dict(good)
    if data.draw(st.booleans()):
        del mutated[field]
    else:
        mutated[field] = data.draw(json_values)
    result = decode(msgspec.json.encode(mutated), TOPICS[topic].record)
    if isinstance(result, DecodeFailure):
        assert result.reason in ("invalid", "schema_version")
        if result.reason == "invalid":
            assert result.detail
    else:
        assert result.schema == SCHEMA_VERSION


def test_wrong_schema_version_is_named_even_when_fields_also_changed() -> None:
    raw = msgspec.json.encode({"schema": 2, "event_id": "e"})
    result = decode(raw, TOPICS["clicks"].record)
    assert isinstance(result, DecodeFailure)
    assert result.reason == "schema_version" and "2" in result.detail


def test_json_schema_is_published_for_every_topic() -> None:
    for spec in TOPICS.values():
        schema = json_schema(spec.record)
        assert "$defs" in schema or "properties" in schema


def test_slate_position_outside_the_slate_is_invalid_and_named() -> None:
    from streams.schemas import DecodeFailure, Impression, SlateItem, decode, encode

    ok = Impression(request_id="r", event_time=1.0, user_id="u", model_version="m",
                    slate=[SlateItem(ad_id="a", semantic_id=[], position=0, score=0.0,
                                     bid=1.0, bid_type="cpc")])
    bad = encode(ok).replace(b'"position":0', b'"position":3')
    failure = decode(bad, Impression)
    assert isinstance(failure, DecodeFailure) and failure.reason == "invalid"
    assert "slate[0].position 3 is outside the slate" in failure.detail


def test_logging_propensity_is_optional_checked_and_old_records_stay_readable() -> None:
    from streams.schemas import Impression

    old = (b'{"schema":1,"request_id":"r","event_time":1.0,"user_id":"u","model_version":"m",'
           b'"slate":[{"ad_id":"a","semantic_id":[],"position":0,"score":0.0,"bid":1.0,'
           b'"bid_type":"cpc"}]}')
    rec = decode(old, Impression)
    assert isinstance(rec, Impression) and rec.slate[0].propensity is None
    new = decode(old.replace(b'"cpc"}', b'"cpc","propensity":0.25}'), Impression)
    assert isinstance(new, Impression) and new.slate[0].propensity == 0.25
    bad = decode(old.replace(b'"cpc"}', b'"cpc","propensity":1.5}'), Impression)
    assert isinstance(bad, DecodeFailure) and "slate[0].propensity 1.5" in bad.detail
