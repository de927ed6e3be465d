"""Organic items of a mixed feed in the learner: their ids in the ads' id space, their
engagement as a reward, and the organic term of the online step."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from learner import synthetic
from learner.model import GenerativeRecommender
from learner.pretrain import active_organic, load_events, tokenizer_for
from learner.rspo import RSPOConfig, organic_engagement
from learner.rspo_step import OnlineLearner, lists_to_batch
from learner.tokenizer import UASIDTokenizer
from streams.schemas import (
    Feedback,
    FeedbackItem,
    OrganicFeedbackItem,
    OrganicItem,
    encode,
)
from tests.learner.conftest import SMALL_TOKENIZER, small_cfg, small_settings

TOPICS = ("gaming/consoles", "travel/flights", "retail/running-shoes", "finance/cards")


def organic_records(n_per_topic: int = 3) -> list[OrganicItem]:
    return [OrganicItem(item_id=f"{t}#{n}", kind="video" if n % 2 else "article", topic=t,
                        title=f"{t.split('/')[1].replace('-', ' ')} review number {n}",
                        description=f"all about {t}", created_time=0.0, event_time=0.0)
            for t in TOPICS for n in range(n_per_topic)]


@pytest.fixture(scope="module")
def organic_tok(synth_log: synthetic.SyntheticLog) -> UASIDTokenizer:
    return UASIDTokenizer.fit(synth_log.ads, SMALL_TOKENIZER, organic=organic_records())


def _feedback(tok: UASIDTokenizer, organic: list[OrganicFeedbackItem],
              request_id: str = "r1") -> Feedback:
    ad = next(iter(tok.table()))
    item = FeedbackItem(ad_id=ad, semantic_id=list(tok.ids_of(ad)), position=0, score=0.0,
                        bid=1.0, bid_type="cpc", clicked=True, reward=1.0)
    return Feedback(request_id=request_id, user_id="u1", kind="final", revision=0,
                    impression_time=10.0, event_time=20.0, elapsed_s=10.0,
                    window_closed=True, context={"device": "mobile"}, items=[item],
                    organic=organic)


def _slot(tok: UASIDTokenizer, item_id: str, position: int, **kw: object
          ) -> OrganicFeedbackItem:
    sid = list(tok.organic_ids_of(item_id)) if item_id in tok.organic_table() else [0]
    return OrganicFeedbackItem(item_id=item_id, semantic_id=sid, position=position,
                               score=-1.0, **kw)  # type: ignore[arg-type]


def test_engagement_reward_counts_a_like_and_capped_dwell_of_viewed_items_only() -> None:
    assert organic_engagement(False, True, 100.0, 30.0) == 0.0
    assert organic_engagement(True, False, 0.0, 30.0) == 0.0
    assert organic_engagement(True, False, 15.0, 30.0) == pytest.approx(0.5)
    assert organic_engagement(True, True, 300.0, 30.0) == pytest.approx(2.0)
    assert organic_engagement(True, True, -5.0, 30.0) == pytest.approx(1.0)


def test_organic_records_get_ids_from_their_title_and_description(
        organic_tok: UASIDTokenizer) -> None:
    table = organic_tok.organic_table()
    assert set(table) == {o.item_id for o in organic_records()}
    assert not set(table) & set(organic_tok.table())       # never an ad's id
    ads = {tuple(s) for s in organic_tok.table().values()}
    assert all(tuple(s) not in ads for s in table.values())


def test_pretraining_places_organic_items_in_a_fitted_or_loaded_id_space(
        tmp_path: Path, synth_log: synthetic.SyntheticLog) -> None:
    s = small_settings(tmp_path / "run")
    first = organic_records(2)
    tok = tokenizer_for(s, synth_log.ads, first)
    assert set(tok.organic_table()) == {o.item_id for o in first}
    more = organic_records(3)                                 # one new item per topic
    again = tokenizer_for(s, synth_log.ads, more)
    assert again.id_space_version == tok.id_space_version
    assert set(again.organic_table()) == {o.item_id for o in more}
    assert all(again.organic_table()[o.item_id] == tok.organic_table()[o.item_id]
               for o in first)


def test_pretraining_reads_organic_records_from_a_file(
        tmp_path: Path, synth_log: synthetic.SyntheticLog) -> None:
    ads, fb, org = tmp_path / "ads.jsonl", tmp_path / "fb.jsonl", tmp_path / "org.jsonl"
    ads.write_bytes(b"".join(encode(a) + b"\n" for a in synth_log.ads))
    fb.write_bytes(b"".join(encode(f) + b"\n" for f in synth_log.feedback[:20]))
    recs = organic_records(2)
    removed = OrganicItem(**{**{f: getattr(recs[0], f) for f in recs[0].__struct_fields__},
                             "status": "removed", "event_time": 5.0})
    org.write_bytes(b"".join(encode(o) + b"\n" for o in [*recs, removed]))
    _, _, organic = load_events(small_settings(tmp_path / "run", ads=ads, feedback=fb,
                                               organic=org))
    assert {o.item_id for o in organic} == {o.item_id for o in recs[1:]}
    assert active_organic([recs[0], removed]) == []


def test_lists_carry_organic_items_only_when_the_organic_term_reads_them(
        organic_tok: UASIDTokenizer) -> None:
    model = GenerativeRecommender(small_cfg(organic_tok))
    fb = _feedback(organic_tok, [
        _slot(organic_tok, "gaming/consoles#1", 1, viewed=True, liked=True, dwell_s=60.0),
        _slot(organic_tok, "travel/flights#0", 0, viewed=True, dwell_s=15.0),
        _slot(organic_tok, "nowhere/unknown#9", 2, viewed=True, liked=True),
    ])
    assert lists_to_batch([(fb, 1.0)], organic_tok, model).organic_items is None
    b = lists_to_batch([(fb, 1.0), (_feedback(organic_tok, [], "r2"), 1.0)], organic_tok,
                       model, organic_dwell_s=30.0)
    assert b.organic_items is not None and b.organic_mask is not None
    assert b.organic_rewards is not None
    assert b.organic_mask.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    # feed order (position), the unknown item left out
    assert b.organic_items[0, 0].tolist() == list(organic_tok.organic_ids_of("travel/flights#0"))
    assert b.organic_items[0, 1].tolist() == list(
        organic_tok.organic_ids_of("gaming/consoles#1"))
    assert b.organic_rewards[0, :2].tolist() == pytest.approx([0.5, 2.0])


def _organic_logp(model: GenerativeRecommender, b: object, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        level, _, _ = model.level_logprob_and_memory(b, ids)   # type: ignore[arg-type]
    return level.sum(-1)


@pytest.mark.parametrize("hepo", [0.0, 0.5])
def test_the_organic_term_raises_engaged_items_over_ignored_ones(
        organic_tok: UASIDTokenizer, hepo: float) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(organic_tok))
    liked, ignored = "gaming/consoles#1", "finance/cards#2"
    fb = _feedback(organic_tok, [
        _slot(organic_tok, liked, 0, viewed=True, liked=True, dwell_s=90.0),
        _slot(organic_tok, ignored, 1),
    ])
    learner = OnlineLearner(model, RSPOConfig(organic_weight=1.0, hepo_weight=hepo), lr=5e-3)
    b = lists_to_batch([(fb, 1.0)] * 4, organic_tok, model,
                       organic_dwell_s=learner.organic_dwell_s)
    assert b.organic_items is not None
    ids = b.organic_items
    before = _organic_logp(model, b, ids)[0]
    for _ in range(20):
        stats = learner.update(b)
    after = _organic_logp(model, b, ids)[0]
    assert stats["organic"] != 0.0 and stats["organic_items"] == 8.0
    assert (after[0] - after[1]) > (before[0] - before[1]) + 0.5


def test_without_the_organic_weight_organic_feedback_changes_nothing(
        organic_tok: UASIDTokenizer) -> None:
    fbs = [_feedback(organic_tok, [_slot(organic_tok, "gaming/consoles#1", 0, viewed=True,
                                         liked=True)]),
           _feedback(organic_tok, [])]
    out = []
    for fb in fbs:
        torch.manual_seed(0)
        model = GenerativeRecommender(small_cfg(organic_tok))
        learner = OnlineLearner(model, RSPOConfig(organic_weight=0.0), lr=5e-3)
        assert learner.organic_dwell_s is None
        learner.update(lists_to_batch([(fb, 1.0)], organic_tok, model,
                                      organic_dwell_s=learner.organic_dwell_s))
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(out[0], out[1])


def test_engaged_organic_items_are_pretraining_targets_apart_from_the_ads(
        organic_tok: UASIDTokenizer, synth_log: synthetic.SyntheticLog) -> None:
    from learner.data import build_examples

    fb = synth_log.feedback[0]
    mixed = msgspec.structs.replace(fb, organic=[
        _slot(organic_tok, "gaming/consoles#1", 0, viewed=True, liked=True, dwell_s=90.0),
        _slot(organic_tok, "travel/flights#0", 1, viewed=True, dwell_s=15.0),
        _slot(organic_tok, "finance/cards#2", 2),                       # not viewed
        _slot(organic_tok, "nowhere/unknown#9", 3, viewed=True, liked=True)])
    plain = build_examples([mixed], organic_tok, history_len=10)
    ex = build_examples([mixed], organic_tok, history_len=10, organic_dwell_s=30.0)
    assert len(ex) == len(plain) + 2 and ex.organic is not None
    rows = ex.organic_positives
    assert ex.organic[rows].all() and len(rows) == 2
    assert [tuple(t) for t in ex.target[rows]] == [
        organic_tok.organic_ids_of("gaming/consoles#1"),
        organic_tok.organic_ids_of("travel/flights#0")]
    assert ex.value[rows].tolist() == pytest.approx([2.0, 0.5])
    # the ad rows are as without organic targets; organic rows carry no slate, no MTP
    assert ex.positives.tolist() == plain.positives.tolist()
    assert (ex.slate_mask[rows] == 0).all() and (ex.mtp_mask[rows] == 0).all()
    assert (ex.request[rows] == ex.request[0]).all()
