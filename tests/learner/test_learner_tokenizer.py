"""UA-SID: unique ids, online assignment without refitting, exact save/load, reports."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from learner import synthetic
from learner.embeddings import ad_text, embed_ads
from learner.tokenizer import (
    TokenizerConfig,
    UASIDTokenizer,
    balanced_kmeans,
)
from streams.schemas import Ad


def _ad(ad_id: str, title: str = "brand1 trail runners", desc: str = "free shipping on shoes",
        **kw: object) -> Ad:
    base: dict[str, object] = dict(
        ad_id=ad_id, advertiser_id="brand1", industry="apparel", bid_type="cpc",
        conversion_goal="click", bid=1.0, budget=100.0, title=title, description=desc,
        created_time=0.0, event_time=0.0)
    base.update(kw)
    return Ad(**base)  # type: ignore[arg-type]


def test_every_live_ad_gets_a_unique_id(small_tokenizer: UASIDTokenizer,
                                        synth_log: synthetic.SyntheticLog) -> None:
    table = small_tokenizer.table()
    assert set(table) == {a.ad_id for a in synth_log.ads}
    assert len({tuple(s) for s in table.values()}) == len(table)
    for ad_id, sid in table.items():
        assert small_tokenizer.ad_of(sid) == ad_id
        assert len(sid) == small_tokenizer.config.id_len == 2 + 3 + 1


def test_identical_creatives_with_different_business_setups_differ_in_business_tokens(
        small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog) -> None:
    by_text: dict[tuple[str, str], list[Ad]] = {}
    for ad in synth_log.ads:
        by_text.setdefault((ad.title, ad.description), []).append(ad)
    pairs = [g for g in by_text.values()
             if len({(a.bid_type, a.conversion_goal) for a in g}) > 1]
    assert pairs, "the synthetic log should contain duplicated creatives"
    L = small_tokenizer.config.semantic_levels
    for group in pairs:
        sids = [small_tokenizer.ids_of(a.ad_id) for a in group]
        assert len(set(sids)) == len(sids)
        assert len({s[:L] for s in sids}) == 1  # same content -> same semantic codes
        goal_token = {(a.bid_type, a.conversion_goal): s[L + 1]
                      for a, s in zip(group, sids, strict=True)}
        assert len(set(goal_token.values())) == len(goal_token)  # setups -> distinct tokens


def test_real_minilm_encoder_separates_same_creative_under_different_goals() -> None:
    ads = [_ad("shoe-click"), _ad("shoe-buy", bid_type="cpa", conversion_goal="purchase"),
           _ad("shoe-install", bid_type="cpa", conversion_goal="app_install")]
    ads += [_ad(f"coffee-{i}", title=f"brand{i} espresso beans", desc="half price on coffee",
                industry="food") for i in range(4)]
    ads += [_ad(f"hotel-{i}", title=f"brand{i} beach resort", desc="members save on hotels",
                industry="travel") for i in range(4)]
    tok = UASIDTokenizer.fit(ads, TokenizerConfig(level_sizes=(4, 2), industry_size=8,
                                                  goal_size=8, advertiser_size=8,
                                                  suffix_size=4))  # default encoder: minilm
    assert tok.config.encoder == "minilm"
    assert tok.codebooks[0].shape == (4, 384)
    sids = [tok.ids_of(a.ad_id) for a in ads]
    assert len(set(sids)) == len(ads)
    shoe = sids[:3]
    assert len({s[:2] for s in shoe}) == 1 and len({s[3] for s in shoe}) == 3
    # content matters: coffee ads and hotel ads mostly sit under different coarse codes
    # (balanced k-means caps a code at ceil(11/4) = 3 ads, so not all four share one)
    def majority(group: list[tuple[int, ...]]) -> int:
        return Counter(s[0] for s in group).most_common(1)[0][0]

    assert majority(sids[3:7]) != majority(sids[7:])


def test_new_ad_gets_an_id_online_without_refitting(small_tokenizer: UASIDTokenizer,
                                                    synth_log: synthetic.SyntheticLog,
                                                    tmp_path) -> None:
    tok = UASIDTokenizer.load(small_tokenizer.save(tmp_path / "tok"))
    before_codebooks = [c.copy() for c in tok.codebooks]
    before = tok.table()
    src = synth_log.ads[0]
    twin = _ad("new-twin", title=src.title, desc=src.description, advertiser_id=src.advertiser_id,
               industry=src.industry, bid_type=src.bid_type, conversion_goal=src.conversion_goal)
    new = _ad("new-other", title="brand7 sofa bed", desc="new arrivals on furniture",
              industry="a-new-industry")
    sid_twin = tok.assign(twin)
    sid_new = tok.assign(new)
    assert tok.id_space_version == small_tokenizer.id_space_version
    assert all(np.array_equal(a, b) for a, b in zip(before_codebooks, tok.codebooks, strict=True))
    assert {k: tok.table()[k] for k in before} == before  # nobody else moved
    src_sid = tok.ids_of(src.ad_id)
    L = tok.config.semantic_levels
    assert sid_twin[L:-1] == src_sid[L:-1] and sid_twin != src_sid  # same business tokens
    # online codes are the nearest codes (fit-time codes came from balanced assignment)
    assert sid_twin[:L] == tok.encode_semantic(
        tok_embed(tok, src))
    assert tok.ad_of(sid_twin) == "new-twin" and tok.ad_of(sid_new) == "new-other"
    assert len({tuple(s) for s in tok.table().values()}) == len(tok)
    assert tok.assign(twin) == sid_twin  # stable


def tok_embed(tok: UASIDTokenizer, ad: Ad) -> np.ndarray:
    return embed_ads([ad_text(ad)], tok.config.encoder)[0]


def test_suffix_overflow_moves_to_nearest_free_code() -> None:
    ads = [_ad(f"same-{i}") for i in range(6)] + [_ad("other", title="x", desc="y z")]
    tok = UASIDTokenizer.fit(ads, TokenizerConfig(level_sizes=(2, 4), industry_size=4,
                                                  goal_size=4, advertiser_size=2, suffix_size=2,
                                                  encoder="hashing"))
    sids = [tok.ids_of(a.ad_id) for a in ads]
    assert len(set(sids)) == len(sids)
    assert max(s[-1] for s in sids) <= 1


def test_save_load_round_trips_exactly(small_tokenizer: UASIDTokenizer, tmp_path) -> None:
    small_tokenizer.save(tmp_path / "tok")
    loaded = UASIDTokenizer.load(tmp_path / "tok")
    assert loaded.table() == small_tokenizer.table()
    assert list(loaded.table()) == list(small_tokenizer.table())
    assert loaded.id_space_version == small_tokenizer.id_space_version
    assert loaded.config == small_tokenizer.config
    for a, b in zip(loaded.codebooks, small_tokenizer.codebooks, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert loaded.report() == small_tokenizer.report()
    loaded.save(tmp_path / "tok2")
    assert (tmp_path / "tok2" / "tokenizer.json").read_text() == \
        (tmp_path / "tok" / "tokenizer.json").read_text()


def test_report_gives_collision_utilization_and_reconstruction(
        small_tokenizer: UASIDTokenizer) -> None:
    r = small_tokenizer.report()
    assert 0.0 <= r["collision_rate_before_suffix"] <= r["collision_rate_semantic"] <= 1.0
    assert r["collision_rate_before_suffix"] < r["collision_rate_semantic"]
    assert all(0.5 < u <= 1.0 for u in r["codebook_utilization"])
    assert 0.0 <= r["reconstruction_error"] < 1.0
    assert r["live_ads"] == len(small_tokenizer)


def test_balanced_kmeans_uses_every_code_about_equally() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (150, 8)), rng.normal(3, 0.1, (10, 8))])
    _, codes = balanced_kmeans(x, 16, 8, rng)
    counts = np.bincount(codes, minlength=16)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 160


@pytest.mark.parametrize("sizes", [(8,), (8, 4, 2)])
def test_per_level_sizes_are_configurable(synth_log: synthetic.SyntheticLog,
                                          sizes: tuple[int, ...]) -> None:
    cfg = TokenizerConfig(level_sizes=sizes, encoder="hashing")
    tok = UASIDTokenizer.fit(synth_log.ads[:60], cfg)
    assert tok.config.token_sizes[: len(sizes)] == sizes
    _, arr = tok.id_array()
    assert arr.shape == (60, len(sizes) + 4)
    assert (arr < np.array(cfg.token_sizes)).all()
