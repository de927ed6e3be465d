"""One semantic-ID space for ads and organic items; auto coarse-to-fine sizes;
RQ-Kmeans+ refinement (determinism, reconstruction, dead-code reset, co-occurrence);
old tokenizer.json files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from learner import synthetic
from learner.embeddings import ad_text, embed_ads
from learner.tokenizer import (
    ORGANIC_GOAL,
    ORGANIC_INDUSTRY,
    OrganicItem,
    TokenizerConfig,
    TokenizerError,
    UASIDTokenizer,
    UnknownIdError,
    auto_level_sizes,
    code_metrics,
    nearest_codes,
    refine_rq,
)
from streams.schemas import Ad

OLD_CONFIG_KEYS = {"level_sizes", "industry_size", "goal_size", "advertiser_size",
                   "suffix_size", "kmeans_iters", "seed", "encoder"}
"""The config keys of tokenizer.json before organic items, auto sizes and refinement."""


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cfg(**kw: object) -> TokenizerConfig:
    base: dict[str, object] = dict(level_sizes=(16, 8), industry_size=16, goal_size=8,
                                   advertiser_size=8, suffix_size=8, encoder="hashing")
    base.update(kw)
    return TokenizerConfig(**base)  # type: ignore[arg-type]


def _organic(n: int) -> list[OrganicItem]:
    words = ["trail shoes review", "espresso brewing guide", "beach resort vlog",
             "credit card tips", "racing game stream", "meal kit unboxing"]
    topics = ["retail/running-shoes", "food/coffee", "travel/beach-holidays",
              "finance/credit-cards", "gaming/racing-games", "food/meal-kits"]
    return [OrganicItem(f"{topics[i % 6]}#{i}", f"{words[i % 6]} part {i % 4}")
            for i in range(n)]


def _ad(ad_id: str, title: str, desc: str) -> Ad:
    return Ad(ad_id=ad_id, advertiser_id="brand1", industry="apparel", bid_type="cpc",
              conversion_goal="click", bid=1.0, budget=100.0, title=title, description=desc,
              created_time=0.0, event_time=0.0)


# ---- organic items ----------------------------------------------------------------------


@pytest.mark.parametrize("refine_steps", [0, 60])
def test_organic_item_and_ad_with_the_same_content_share_the_semantic_prefix(
        synth_log: synthetic.SyntheticLog, refine_steps: int) -> None:
    ads = synth_log.ads[:80]
    tok = UASIDTokenizer.fit(ads, _cfg(refine_steps=refine_steps), organic=_organic(40))
    L = tok.config.semantic_levels
    # placed online: an ad and an organic item with one text
    new_ad = _ad("new-ad", "brand3 trail running shoes", "free shipping on shoes")
    sid_ad = tok.assign(new_ad)
    sid_org = tok.assign_organic(("retail/running-shoes#999", ad_text(new_ad)))
    assert sid_ad[:L] == sid_org[:L]
    assert sid_org[L:L + 2] == (ORGANIC_INDUSTRY, ORGANIC_GOAL) != sid_ad[L:L + 2]
    # an organic copy of a fitted ad's content lands under that ad's semantic codes too
    src = ads[0]
    twin = tok.assign_organic(OrganicItem("twin#1", ad_text(src), "retail/x"))
    emb = embed_ads([ad_text(src)], "hashing")[0]
    assert twin[:L] == tok.encode_semantic(emb)


def test_fit_time_organic_items_share_codes_with_same_content_ads(
        synth_log: synthetic.SyntheticLog) -> None:
    ads = synth_log.ads[:60]
    copies = [OrganicItem(f"copy/{a.ad_id}#1", ad_text(a)) for a in ads[:10]]
    tok = UASIDTokenizer.fit(ads, _cfg(assignment="nearest"), organic=copies + _organic(30))
    L = tok.config.semantic_levels
    for ad, item in zip(ads[:10], copies, strict=True):
        assert tok.ids_of(ad.ad_id)[:L] == tok.organic_ids_of(item.item_id)[:L]
    assert tok.fit_report["organic_items"] == 40


def test_organic_ids_are_their_own_table_in_the_same_id_space(
        synth_log: synthetic.SyntheticLog, tmp_path: Path) -> None:
    items = _organic(50)
    tok = UASIDTokenizer.fit(synth_log.ads[:60], _cfg(), organic=items)
    assert set(tok.table()) == {a.ad_id for a in synth_log.ads[:60]} and len(tok) == 60
    org = tok.organic_table()
    assert list(org) == [i.item_id for i in items]
    every = [tuple(s) for s in [*tok.table().values(), *org.values()]]
    assert len(set(every)) == len(every)  # no organic id equals an ad id (or another)
    L = tok.config.semantic_levels
    assert all(s[L] == ORGANIC_INDUSTRY and s[L + 1] == ORGANIC_GOAL for s in org.values())
    assert all(s[L] != ORGANIC_INDUSTRY for s in tok.table().values())
    one = items[0].item_id
    assert tok.organic_of(org[one]) == one
    with pytest.raises(UnknownIdError):
        tok.ad_of(org[one])
    assert tok.add_organic([items[0], ("news/new#1", "a brand new article")])[one] == \
        tuple(org[one])
    back = UASIDTokenizer.load(tok.save(tmp_path / "tok"))
    assert back.organic_table() == tok.organic_table() and back.table() == tok.table()
    assert back.report() == tok.report()


# ---- auto sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 150, 2000, 100_000])
def test_auto_sizes_are_coarse_to_fine(n: int) -> None:
    sizes = auto_level_sizes(n, levels=3, growth=2.0, oversample=4.0)
    assert len(sizes) == 3 and all(s >= 2 for s in sizes)
    assert list(sizes) == sorted(sizes)
    if n >= 150:
        assert sizes[0] < sizes[1] < sizes[2]
        assert 0.5 < math.prod(sizes) / (4.0 * n) < 2.0
        assert sizes[0] <= round(n ** (1 / 3)) <= sizes[2]


def test_auto_config_resolves_at_fit_and_explicit_sizes_still_work(
        synth_log: synthetic.SyntheticLog, tmp_path: Path) -> None:
    cfg = _cfg(level_sizes="auto", auto_levels=3)
    assert cfg.semantic_levels == 3 and not cfg.resolved
    with pytest.raises(TokenizerError):
        _ = cfg.token_sizes
    tok = UASIDTokenizer.fit(synth_log.ads, cfg, organic=_organic(30))
    assert tok.config.auto_sizes and tok.config.sizes == auto_level_sizes(150, 3)
    assert tok.config.token_sizes[:3] == tok.config.sizes
    assert UASIDTokenizer.load(tok.save(tmp_path / "t")).config == tok.config
    explicit = UASIDTokenizer.fit(synth_log.ads, _cfg(level_sizes=(8, 4)))
    assert explicit.config.sizes == (8, 4) and not explicit.config.auto_sizes
    with pytest.raises(TokenizerError):
        TokenizerConfig(level_sizes="big")


# ---- refinement -------------------------------------------------------------------------


def test_refinement_is_deterministic_for_a_seed(synth_log: synthetic.SyntheticLog) -> None:
    def fit(seed: int) -> UASIDTokenizer:
        return UASIDTokenizer.fit(synth_log.ads, _cfg(refine_steps=40, seed=seed),
                                  organic=_organic(20))

    a, b, c = fit(3), fit(3), fit(4)
    assert a.id_space_version == b.id_space_version != c.id_space_version
    assert a.table() == b.table() and a.organic_table() == b.organic_table()
    assert all(np.array_equal(x, y) for x, y in zip(a.codebooks, b.codebooks, strict=True))
    assert a.encoder is not None and b.encoder is not None
    assert np.array_equal(a.encoder.w1, b.encoder.w1)


def test_refinement_does_not_increase_reconstruction_error(
        synth_log: synthetic.SyntheticLog) -> None:
    """The RQ-VAE setting (nearest codes, fit-time and online): after refinement the
    latent residual and the decoded codes are no worse than the RQ-KMeans init's."""
    x = embed_ads([ad_text(a) for a in synth_log.ads], "hashing")
    init = UASIDTokenizer.fit(synth_log.ads, _cfg(assignment="nearest"), embeddings=x)
    ref = UASIDTokenizer.fit(synth_log.ads, _cfg(assignment="nearest", refine_steps=200),
                             embeddings=x)
    assert ref.fit_report["init_reconstruction_error"] == pytest.approx(
        init.fit_report["reconstruction_error"])
    # without refinement the latent is the embedding and decoding is the identity
    assert ref.fit_report["reconstruction_error_input"] <= \
        init.fit_report["reconstruction_error"]
    assert ref.fit_report["reconstruction_error"] <= init.fit_report["reconstruction_error"]
    q_init, q_ref = init.quality(x), ref.quality(x)  # items placed online
    assert q_ref["reconstruction_error"] <= q_init["reconstruction_error"]
    assert q_ref["reconstruction_error_input"] <= q_init["reconstruction_error_input"]


def test_refinement_at_step_zero_is_the_rq_kmeans_init() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    cbs = [rng.standard_normal((4, 8)).astype(np.float32) for _ in range(2)]
    ref = refine_rq(x, cbs, 0)
    assert np.array_equal(ref.encoder(x), x) and np.array_equal(ref.decoder(x), x)
    assert all(np.array_equal(a, b) for a, b in zip(ref.codebooks, cbs, strict=True))


def test_dead_code_reset_raises_utilisation_on_a_collapsed_init() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    level0 = 100.0 * rng.standard_normal((8, 16)).astype(np.float32)
    level0[0] = x.mean(0)  # every item picks code 0: a collapsed codebook
    cbs = [level0, 0.1 * rng.standard_normal((4, 16)).astype(np.float32)]
    codes, res = nearest_codes(x, cbs)
    assert code_metrics(x, codes, res, (8, 4))["utilisation"][0] == 1 / 8

    def utilisation(reset_every: int) -> float:
        ref = refine_rq(x, cbs, 100, seed=0, reset_every=reset_every, balanced=False)
        z = ref.encoder(x)
        c, r = nearest_codes(z, ref.codebooks)
        return float(code_metrics(z, c, r, (8, 4))["utilisation"][0])

    assert utilisation(0) == 1 / 8  # no countermeasure: unused codes never get a gradient
    assert utilisation(10) >= 0.75


@pytest.mark.parametrize("assignment", ["balanced", "nearest"])
def test_cooccurrence_term_raises_prefix_agreement_of_cooccurring_pairs(
        assignment: str) -> None:
    rng = np.random.default_rng(0)
    n = 64
    x = rng.standard_normal((n, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ads = [dict(ad_id=f"a{i}", industry="retail", bid_type="cpc", conversion_goal="click",
                advertiser_id=f"adv{i % 5}", title=f"t{i}", description="d") for i in range(n)]
    pairs = [(f"a{i}", f"a{i + n // 2}") for i in range(n // 2)]  # unrelated content

    def agreement(weight: float) -> float:
        tok = UASIDTokenizer.fit(ads, _cfg(level_sizes=(4, 4), refine_steps=200,
                                           cooc_weight=weight, assignment=assignment),
                                 embeddings=x, cooc=[*pairs, ("a0", "unknown")])
        assert tok.fit_report["cooc_pairs_used"] == len(pairs)
        return tok.prefix_agreement(pairs)

    without, with_cooc = agreement(0.0), agreement(1.0)
    assert with_cooc > without
    assert with_cooc > 0.25  # above chance for 4 equally used level-0 codes


# ---- persistence and online placement ---------------------------------------------------


def test_old_tokenizer_json_loads_with_the_old_behaviour(synth_log: synthetic.SyntheticLog,
                                                         tmp_path: Path) -> None:
    tok = UASIDTokenizer.fit(synth_log.ads, _cfg())
    d = tok.save(tmp_path / "old")
    meta = json.loads((d / "tokenizer.json").read_text())
    assert set(meta["config"]) == OLD_CONFIG_KEYS and "organic_ids" not in meta
    # a file written before this change: only the old keys, no encoder arrays
    (d / "tokenizer.json").write_text(json.dumps(meta))
    with np.load(d / "codebooks.npz") as z:
        assert sorted(z.files) == ["level_0", "level_1"]
    old = UASIDTokenizer.load(d)
    assert old.encoder is None and old.config.refine_steps == 0
    assert old.config.cooc_weight == 0 and old.config.assignment == "balanced"
    assert old.table() == tok.table() and old.id_space_version == tok.id_space_version
    emb = embed_ads(["brand9 road racing shoes. members save"], "hashing")[0]
    codes, _ = nearest_codes(emb[None, :], old.codebooks)  # no encoder in between
    assert old.encode_semantic(emb) == tuple(int(c) for c in codes[0])


def test_refined_tokenizer_places_new_items_through_its_encoder(
        synth_log: synthetic.SyntheticLog, tmp_path: Path) -> None:
    tok = UASIDTokenizer.fit(synth_log.ads[:100], _cfg(refine_steps=60), organic=_organic(20))
    assert tok.encoder is not None
    back = UASIDTokenizer.load(tok.save(tmp_path / "r"))
    assert back.encoder is not None and back.decoder is not None
    assert np.array_equal(back.encoder.w2, tok.encoder.w2)
    new = synth_log.ads[100:110]
    embs = embed_ads([ad_text(a) for a in new], "hashing")
    for tk in (tok, back):
        got = tk.add_ads(new)
        codes, _ = nearest_codes(tk.latent(embs), tk.codebooks)
        for ad, row in zip(new, codes, strict=True):
            assert got[ad.ad_id][:2] == tuple(int(c) for c in row)
    assert back.table() == tok.table()
    assert back.assign_organic(("food/coffee#77", "cold brew at home")) == \
        tok.assign_organic(("food/coffee#77", "cold brew at home"))


def test_report_gives_utilisation_collision_rate_and_reconstruction_error(
        synth_log: synthetic.SyntheticLog) -> None:
    tok = UASIDTokenizer.fit(synth_log.ads, _cfg(refine_steps=20), organic=_organic(30))
    r = tok.report()
    assert len(r["utilisation"]) == 2 and all(0 < u <= 1 for u in r["utilisation"])
    every = [*tok.table().values(), *tok.organic_table().values()]
    assert r["utilisation"][0] == len({s[0] for s in every}) / 16
    assert 0.0 <= r["collision_rate"] <= 1.0
    assert 0.0 <= r["reconstruction_error"] < 1.0
    assert 0.0 <= r["reconstruction_error_input"] < 1.0
    assert r["live_organic_items"] == 30 and r["refined"] is True
