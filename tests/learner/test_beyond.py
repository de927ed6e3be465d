"""Beyond-accuracy metrics on tiny hand-built slates, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from learner.beyond import (
    BEYOND_KEYS,
    beyond_accuracy,
    catalog_coverage,
    category_diversity,
    click_bits,
    intra_list_diversity,
    novelty_bits,
    novelty_unseen,
    personalization,
)
from streams.schemas import Feedback, FeedbackItem

# u1 is shown [a b c] then [b e]; u2 is shown [a d] in between
USERS = ["u1", "u2", "u1"]
SLATES = [["a", "b", "c"], ["a", "d"], ["b", "e"]]
CATEGORY = {"a": "x", "b": "x", "c": "y", "d": "y", "e": "z"}
PREFIX = {"a": 0, "b": 0, "c": 1, "d": 0, "e": 2}


def test_category_diversity_is_distinct_categories_over_slate_length() -> None:
    # {x, y} / 3, {x, y} / 2, {x, z} / 2
    assert category_diversity(SLATES, CATEGORY.__getitem__) == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert math.isnan(category_diversity([[]], CATEGORY.__getitem__))


def test_intra_list_diversity_is_the_share_of_pairs_in_different_clusters() -> None:
    # [a b c]: (a,b) same, (a,c) and (b,c) differ -> 2/3; [a d]: same -> 0; [b e] -> 1
    assert intra_list_diversity(SLATES, PREFIX.__getitem__) == pytest.approx(5 / 9)
    # a one-ad slate has no pair and does not count
    assert intra_list_diversity([*SLATES, ["c"]], PREFIX.__getitem__) == pytest.approx(5 / 9)
    assert math.isnan(intra_list_diversity([["a"]], PREFIX.__getitem__))
    # with categories as the key: 2/3, 1, 1
    assert intra_list_diversity(SLATES, CATEGORY.__getitem__) == pytest.approx(8 / 9)


def test_catalog_coverage_is_distinct_shown_over_servable() -> None:
    assert catalog_coverage(SLATES, 10) == pytest.approx(5 / 10)
    # given the servable ads, a shown ad outside them does not count: {a, b} of 3
    assert catalog_coverage(SLATES, ["a", "b", "z"]) == pytest.approx(2 / 3)
    assert math.isnan(catalog_coverage(SLATES, 0))


def test_novelty_unseen_counts_ads_the_user_was_not_shown_before() -> None:
    # u1 [a b c] all new; u2 [a d] new to u2; u1 [b e]: b seen -> 6 new of 7 shown
    assert novelty_unseen(USERS, SLATES) == pytest.approx(6 / 7)
    # u2 saw a before the stream
    assert novelty_unseen(USERS, SLATES, prior={"u2": ["a"]}) == pytest.approx(5 / 7)
    # the history is what the log showed: u1 had been shown only x, so b is new again
    assert novelty_unseen(USERS, SLATES, seen=[["x"], ["y"], ["z"]]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        novelty_unseen(["u1"], SLATES)


def test_personalization_is_one_minus_the_overlap_of_different_users_slates() -> None:
    # pairs of different users: (0,1) J = |{a}| / |{a b c d}| = 1/4, (1,2) J = 0;
    # (0,2) is u1 twice and does not count
    assert personalization(USERS, SLATES) == pytest.approx(1 - (1 / 4 + 0) / 2)
    assert math.isnan(personalization(["u1", "u1"], [["a"], ["b"]]))
    # a request that showed nothing is no slate: two empty ones are not "the same"
    assert personalization([*USERS, "u3", "u4"], [*SLATES, [], []]) == pytest.approx(7 / 8)


def test_personalization_samples_pairs_with_a_seed_beyond_max_pairs() -> None:
    users = [f"u{i}" for i in range(60)]
    same = [["a", "b"]] * 60
    disjoint = [[f"ad{i}"] for i in range(60)]
    assert personalization(users, same, max_pairs=50) == 0.0
    assert personalization(users, disjoint, max_pairs=50) == 1.0
    half = [["a"] if i % 2 else ["b"] for i in range(60)]
    a = personalization(users, half, max_pairs=200, seed=1)
    assert a == personalization(users, half, max_pairs=200, seed=1)  # seeded
    # a pair shares its slate about half the time (29/59 exactly over all pairs)
    assert personalization(users, half, max_pairs=10**6) == pytest.approx(1 - 29 / 59)
    assert abs(a - 30 / 59) < 0.12


def _item(ad: str, clicked: bool) -> FeedbackItem:
    return FeedbackItem(ad_id=ad, semantic_id=[0], position=0, score=0.0, bid=1.0,
                        bid_type="cpc", clicked=clicked)


def test_novelty_bits_against_the_logs_click_shares() -> None:
    logs = [Feedback(request_id=f"r{i}", user_id="u", kind="final", revision=0,
                     impression_time=0.0, event_time=0.0, elapsed_s=0.0, window_closed=True,
                     items=items)
            for i, items in enumerate([[_item("a", True), _item("b", False)],
                                       [_item("a", True)]])]
    bits = click_bits(logs)
    # 2 clicks on a, none on b; add-one over {a, b} and one more: 5
    assert bits("a") == pytest.approx(-math.log2(3 / 5))
    assert bits("b") == pytest.approx(-math.log2(1 / 5)) == pytest.approx(bits("never"))
    assert novelty_bits([["a", "b"], ["b"]], bits) == pytest.approx(
        (-math.log2(3 / 5) - 2 * math.log2(1 / 5)) / 3)


def test_beyond_accuracy_reports_what_its_arguments_allow() -> None:
    full = beyond_accuracy(USERS, SLATES, servable=10, category_of=CATEGORY.__getitem__,
                           prefix_of=PREFIX.__getitem__, bits=lambda _a: 2.0)
    assert list(full) == list(BEYOND_KEYS)
    assert full == pytest.approx({
        "catalogue_coverage": 0.5, "slate_diversity": 8 / 9, "sid_diversity": 5 / 9,
        "novelty_unseen": 6 / 7, "novelty_bits": 2.0, "personalization": 7 / 8})
    assert list(beyond_accuracy(USERS, SLATES, servable=10)) == [
        "catalogue_coverage", "novelty_unseen", "personalization"]


def _final(rid: str, user: str, t: float, shown: list[str],
           clicked: tuple[str, ...] = ()) -> Feedback:
    return Feedback(request_id=rid, user_id=user, kind="final", revision=0,
                    impression_time=t, event_time=t, elapsed_s=0.0, window_closed=True,
                    items=[_item(a, a in clicked) for a in shown])


def test_evaluate_reports_beyond_accuracy_of_its_top_k_lists() -> None:
    from learner.evaluate import beyond_of_lists

    # the log: u1 [a] (clicked), u2 [b], then the evaluated part: u1 [c], u2 [a], u2 [b]
    records = [_final("r0", "u1", 0, ["a"], ("a",)), _final("r1", "u2", 1, ["b"]),
               _final("r2", "u1", 2, ["c"]), _final("r3", "u2", 3, ["a"]),
               _final("r4", "u2", 4, ["b"])]
    ads = ["a", "b", "c", "d"]                  # trie rows; level-0 codes 0 1 0 1
    rows = [[0, 5], [1, 5], [0, 6], [1, 6]]
    out = beyond_of_lists(records, {2: [0, 2], 4: [0, 3]}, ads, rows)   # [a c], [a d]
    assert out == pytest.approx({
        "catalogue_coverage": 3 / 4,                    # a c d of 4
        "sid_diversity": (0 + 1) / 2,                   # (a,c) one cluster, (a,d) two
        # r2: u1 had seen a -> c new; r3 (no list) shows u2 a; r4: a seen, d new
        "novelty_unseen": 2 / 4,
        # against r0 r1's clicks: a 1 of (1 + 2 + 1) -> 1 bit, c and d 1/4 -> 2 bits
        "novelty_bits": (1 + 2 + 1 + 2) / 4,
        "personalization": 1 - 1 / 3})                  # [a c] vs [a d]
    assert beyond_of_lists(records, {}, ads, rows) == {}
