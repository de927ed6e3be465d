"""Bad input gives a clear error naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from learner import synthetic
from learner.checkpoint import load_model
from learner.data import DataError, build_examples, read_jsonl
from learner.export import export_run, verify_snapshot
from learner.pretrain import PretrainResult
from learner.tokenizer import (
    IdSpaceMismatchError,
    MissingAttributeError,
    TokenizerConfig,
    UASIDTokenizer,
    UnknownAdError,
    UnknownIdError,
)
from streams.schemas import Ad, Feedback, FeedbackItem


def test_ad_with_missing_attributes_is_refused_naming_the_fields(
        small_tokenizer: UASIDTokenizer) -> None:
    with pytest.raises(MissingAttributeError, match=r"'ad-x'.*industry, conversion_goal"):
        small_tokenizer.assign({"ad_id": "ad-x", "advertiser_id": "a", "bid_type": "cpc",
                                "title": "t", "description": "d"})
    ad = Ad(ad_id="ad-y", advertiser_id="", industry="food", bid_type="cpc",
            conversion_goal="click", bid=1.0, budget=1.0, title="t", description="d",
            created_time=0.0, event_time=0.0)
    with pytest.raises(MissingAttributeError, match=r"'ad-y'.*advertiser_id"):
        small_tokenizer.assign(ad)
    assert "ad-x" not in small_tokenizer and "ad-y" not in small_tokenizer


def test_unknown_id_at_load_time_names_the_ad_and_position(small_tokenizer: UASIDTokenizer,
                                                           tmp_path: Path) -> None:
    d = small_tokenizer.save(tmp_path / "tok")
    meta = json.loads((d / "tokenizer.json").read_text())
    first = next(iter(meta["ids"]))
    meta["ids"][first][1] = 99  # level 1 has 8 codes
    (d / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(UnknownIdError, match=rf"ad '{first}' has token 99 at position 1"):
        UASIDTokenizer.load(d)


def test_unknown_ads_in_logged_events_are_named(small_tokenizer: UASIDTokenizer) -> None:
    fb = Feedback(request_id="req-9", user_id="u", kind="final", revision=0,
                  impression_time=1.0, event_time=2.0, elapsed_s=1.0, window_closed=True,
                  recent_ad_ids=["ghost-ad"], items=[])
    with pytest.raises(UnknownAdError, match=r"'ghost-ad'.*request 'req-9'"):
        build_examples([fb], small_tokenizer)
    assert len(build_examples([fb], small_tokenizer, on_unknown="skip")) == 1
    with pytest.raises(UnknownIdError, match=r"belongs to no ad"):
        small_tokenizer.ad_of([0, 0, 0, 0, 0, 7])


def test_malformed_log_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "fb.jsonl"
    p.write_text('{"schema": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"fb.jsonl:1: not a Feedback \(invalid\)"):
        read_jsonl(p, Feedback)


def test_model_from_another_id_space_is_refused(trained_lazy: PretrainResult,
                                                synth_log: synthetic.SyntheticLog,
                                                tmp_path: Path) -> None:
    other = UASIDTokenizer.fit(synth_log.ads, TokenizerConfig(
        level_sizes=(16, 8), industry_size=16, goal_size=8, advertiser_size=8, suffix_size=8,
        encoder="hashing", seed=123))
    assert other.id_space_version != trained_lazy.tokenizer.id_space_version
    run_dir = tmp_path / "run"
    shutil.copytree(trained_lazy.run_dir, run_dir)
    with pytest.raises(IdSpaceMismatchError, match=other.id_space_version):
        load_model(run_dir, tokenizer=other)
    other.save(run_dir / "tokenizer")  # the run's tokenizer replaced by a refit
    with pytest.raises(IdSpaceMismatchError,
                       match=trained_lazy.tokenizer.id_space_version):
        export_run(run_dir, tmp_path / "snap", "v1")
    assert not (tmp_path / "snap").exists()


def test_snapshot_in_another_id_space_is_refused(trained_lazy: PretrainResult,
                                                 tmp_path: Path) -> None:
    export_run(trained_lazy.run_dir, tmp_path / "snap", "v1")
    with pytest.raises(IdSpaceMismatchError, match=r"snapshot snap is in id space"):
        verify_snapshot(tmp_path / "snap", id_space_version="ids-0000")


def test_feedback_item_with_unknown_slate_ad_is_named(small_tokenizer: UASIDTokenizer) -> None:
    item = FeedbackItem(ad_id="nope", semantic_id=[], position=0, score=0.0, bid=1.0,
                        bid_type="cpc", clicked=True)
    fb = Feedback(request_id="req-7", user_id="u", kind="final", revision=0,
                  impression_time=1.0, event_time=2.0, elapsed_s=1.0, window_closed=True,
                  items=[item])
    with pytest.raises(UnknownAdError, match=r"'nope'.*slate of request 'req-7'"):
        build_examples([fb], small_tokenizer)
