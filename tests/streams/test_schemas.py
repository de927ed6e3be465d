"""Event decoders: exact round trips, and a reason (never an exception) for bad bytes."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.samples import sample_records
from streams.schemas import (
    DLQ_REASONS,
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
        assert msgspec.json.decode(raw)["schema"] == TOPICS[topic].record.SCHEMAS_READ[-1]
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
        assert result.schema in TOPICS[topic].record.SCHEMAS_READ


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
    assert rec.slate[0].exposure == 0.0          # old records: no exposure counted
    seen = decode(old.replace(b'"cpc"}', b'"cpc","exposure":3.0}'), Impression)
    assert isinstance(seen, Impression) and seen.slate[0].exposure == 3.0
    bad = decode(old.replace(b'"cpc"}', b'"cpc","exposure":-1.0}'), Impression)
    assert isinstance(bad, DecodeFailure) and "slate[0].exposure -1.0" in bad.detail


def test_final_beams_are_optional_and_old_records_without_them_stay_readable() -> None:
    from streams.schemas import BeamCandidate, Feedback, Impression

    old_imp = (b'{"schema":1,"request_id":"r","event_time":1.0,"user_id":"u",'
               b'"model_version":"m","slate":[{"ad_id":"a","semantic_id":[1,2],"position":0,'
               b'"score":-0.5,"bid":1.0,"bid_type":"cpc"}]}')
    rec = decode(old_imp, Impression)
    assert isinstance(rec, Impression) and rec.beams == []
    old_fb = (b'{"schema":1,"request_id":"r","user_id":"u","kind":"final","revision":0,'
              b'"impression_time":1.0,"event_time":2.0,"elapsed_s":1.0,"window_closed":true,'
              b'"items":[{"ad_id":"a","semantic_id":[1,2],"position":0,"score":-0.5,'
              b'"bid":1.0,"bid_type":"cpc"}]}')
    fb = decode(old_fb, Feedback)
    assert isinstance(fb, Feedback) and fb.beams == []
    # with beams: an exact round trip, and a beam of the wrong shape is invalid
    beams = [BeamCandidate(ad_id="a", semantic_id=[1, 2], logprob=-0.5, expected_value=0.1,
                           bid=1.0, bid_type="cpc"),
             BeamCandidate(ad_id="b", semantic_id=[1, 3], logprob=-1.2, expected_value=0.01,
                           bid=10.0, bid_type="cpm")]
    new = msgspec.structs.replace(rec, beams=beams)
    assert decode(encode(new), Impression) == new
    bad = decode(encode(new).replace(b'"bid_type":"cpm"', b'"bid_type":"cpx"'), Impression)
    assert isinstance(bad, DecodeFailure) and bad.reason == "invalid" and "beams" in bad.detail


def test_model_updates_read_schemas_1_and_2_and_name_any_other() -> None:
    from streams.schemas import MODEL_UPDATE_SCHEMA, ModelUpdate

    good = msgspec.to_builtins(sample_records(1)["model-updates"][0])
    assert good["schema"] == MODEL_UPDATE_SCHEMA == 2
    for version, readable in ((1, True), (2, True), (3, False)):
        result = decode(msgspec.json.encode({**good, "schema": version}), ModelUpdate)
        if readable:
            assert isinstance(result, ModelUpdate) and result.schema == version
        else:
            assert isinstance(result, DecodeFailure) and result.reason == "schema_version"
            assert "reads 1, 2" in result.detail
