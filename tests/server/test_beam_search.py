"""The beam search and the trie as plain functions over arrays (no HTTP, no ORT)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from server.beam import (
    beam_search,
    expected_value,
    pad_candidates,
    rank_slates,
    sequence_logprob,
)
from server.controller import BeamController, scale_widths
from server.trie import build_trie, sort_ids

SIZES = (5, 4, 3)
ALL_IDS = np.array(list(itertools.product(*[range(s) for s in SIZES])), dtype=np.int64)


def _step_fn(seed: int):
    weights = np.random.default_rng(seed).standard_normal((len(SIZES), 16, max(SIZES)))

    def step(req: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        t = prefix.shape[1]
        return weights[t][req] + 0.3 * prefix.sum(axis=1, keepdims=True)

    return step


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), seed=st.integers(0, 10_000), p=st.floats(0.0, 1.0))
def test_trie_paths_are_exactly_the_servable_ids(n: int, seed: int, p: float) -> None:
    rng = np.random.default_rng(seed)
    ids = ALL_IDS[rng.choice(len(ALL_IDS), n, replace=False)]
    servable = rng.random(n) < p
    trie = build_trie(ids, sort_ids(ids), servable, SIZES)
    assert sorted(trie.rows.tolist()) == sorted(np.flatnonzero(servable).tolist())
    # walking every path through the CSR tables yields the id of its leaf's row
    nodes, prefixes = np.zeros(1, np.int64), np.zeros((1, 0), np.int64)
    for t in range(len(SIZES)):
        owner, code, child = trie.expand(t, nodes)
        prefixes = np.concatenate([prefixes[owner], code[:, None]], axis=1)
        nodes = child
    assert (ids[trie.rows[nodes]] == prefixes).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 4), w=st.integers(1, 6))
def test_beam_search_returns_only_servable_ids_with_exact_logprobs(seed: int, b: int,
                                                                    w: int) -> None:
    rng = np.random.default_rng(seed)
    ids = ALL_IDS[rng.choice(len(ALL_IDS), 30, replace=False)]
    servable = rng.random(30) < 0.5
    trie = build_trie(ids, sort_ids(ids), servable, SIZES)
    step = _step_fn(seed)
    out = beam_search(step, trie, b, [w, w, w])
    assert servable[out.rows].all()
    assert (ids[out.rows] == out.ids).all()
    for r in range(b):
        mine = out.request == r
        assert mine.sum() <= w
        assert len(set(out.rows[mine].tolist())) == mine.sum()      # distinct ads
    # log-probabilities are sums of log-softmax over the allowed children
    allowed = ids[servable]
    for i in range(min(3, len(out.rows))):
        total = 0.0
        for t in range(len(SIZES)):
            pre = out.ids[i, :t]
            logits = step(out.request[i : i + 1], pre[None])[0][: SIZES[t]]
            kids = sorted({int(a[t]) for a in allowed if (a[:t] == pre).all()})
            ls = logits[kids]
            total += logits[out.ids[i, t]] - (ls.max() + np.log(np.exp(ls - ls.max()).sum()))
        assert abs(total - out.logprob[i]) < 1e-9


def test_wide_beams_find_every_servable_ad_and_narrow_beams_keep_the_best() -> None:
    rng = np.random.default_rng(3)
    ids = ALL_IDS[rng.choice(len(ALL_IDS), 40, replace=False)]
    servable = np.ones(40, bool)
    trie = build_trie(ids, sort_ids(ids), servable, SIZES)
    step = _step_fn(3)
    full = beam_search(step, trie, 2, [100, 100, 100])
    assert (np.bincount(full.request) == 40).all()
    greedy = beam_search(step, trie, 2, [1, 1, 1])
    assert greedy.request.tolist() == [0, 1]


def test_the_model_runs_only_for_beams_with_a_choice_and_scores_do_not_change() -> None:
    # ids whose last two levels are fixed by the first: after level 0 no beam has a choice
    ids = np.array([[a, a % 4, a % 3] for a in range(5)], dtype=np.int64)
    trie = build_trie(ids, sort_ids(ids), np.ones(5, bool), SIZES)
    step = _step_fn(5)
    rows_seen: list[tuple[int, int]] = []

    def counting(req: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        rows_seen.append((prefix.shape[1], req.shape[0]))
        return step(req, prefix)

    out = beam_search(counting, trie, 2, [5, 5, 5])
    assert rows_seen == [(0, 2)]                     # one call, level 0, one row per request
    every = beam_search(counting, trie, 2, [5, 5, 5], skip_forced=False)
    assert len(rows_seen) == 4                        # ... against one call per level
    assert (every.rows == out.rows).all() and np.allclose(every.logprob, out.logprob)
    first = step(np.array([0, 1]), np.zeros((2, 0), np.int64))[:, :5]
    expect = first - np.log(np.exp(first).sum(axis=1, keepdims=True))
    assert np.allclose(out.logprob, expect[out.request, out.ids[:, 0]])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), renormalize=st.booleans())
def test_sequence_logprob_scores_an_id_as_the_beam_search_would(seed: int,
                                                                renormalize: bool) -> None:
    rng = np.random.default_rng(seed)
    ids = ALL_IDS[rng.choice(len(ALL_IDS), 25, replace=False)]
    trie = build_trie(ids, sort_ids(ids), rng.random(25) < 0.7, SIZES)
    step = _step_fn(seed)
    wide = beam_search(step, trie, 3, [64, 64, 64], renormalize=renormalize)
    assert wide.request.shape[0] == 3 * trie.n_ads      # every servable ad, every request
    got = sequence_logprob(step, trie, wide.request, wide.ids, renormalize=renormalize)
    np.testing.assert_allclose(got, wide.logprob, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), caps=st.lists(st.integers(1, 12), min_size=1, max_size=5))
def test_per_request_caps_give_each_request_the_beams_it_gets_alone(seed: int,
                                                                     caps: list[int]) -> None:
    rng = np.random.default_rng(seed)
    ids = ALL_IDS[rng.choice(len(ALL_IDS), 40, replace=False)]
    trie = build_trie(ids, sort_ids(ids), np.ones(40, bool), SIZES)
    step = _step_fn(seed)
    T = len(SIZES)
    together = beam_search(step, trie, len(caps), [max(caps)] * T, caps=caps)
    for b, cap in enumerate(caps):
        alone = beam_search(lambda r, p, b=b: step(np.full_like(r, b), p), trie, 1, [cap] * T)
        mine = together.request == b
        assert together.rows[mine].tolist() == alone.rows.tolist()
        assert np.allclose(together.logprob[mine], alone.logprob)
        assert mine.sum() <= cap


def test_empty_trie_gives_empty_beams() -> None:
    ids = ALL_IDS[:10]
    trie = build_trie(ids, sort_ids(ids), np.zeros(10, bool), SIZES)
    out = beam_search(_step_fn(0), trie, 3, [4, 4, 4])
    assert out.request.shape == (0,)
    cands, _ = pad_candidates(out, 3)
    assert cands.shape == (3, 1, 3)


def test_expected_value_per_bid_type_and_ranking() -> None:
    bid = np.array([2.0, 40.0, 1000.0])
    kind = np.array([0, 1, 2])
    pctr, pcvr = np.array([0.1, 0.1, 0.9]), np.array([0.5, 0.5, 0.5])
    ev = expected_value(bid, kind, pctr, pcvr)
    assert np.allclose(ev, [0.2, 2.0, 1.0])
    ids = ALL_IDS[:3]
    trie = build_trie(ids, sort_ids(ids), np.ones(3, bool), SIZES)
    beams = beam_search(_step_fn(1), trie, 1, [3, 3, 3])
    ev = expected_value(bid[beams.rows], kind[beams.rows], pctr[beams.rows], pcvr[beams.rows])
    (top,) = rank_slates(beams, ev, [2])
    assert beams.rows[top].tolist() == [1, 2]
    (only,) = rank_slates(beams, ev, [3], allowed=beams.rows != 1)
    assert 1 not in beams.rows[only].tolist()


def test_widths_scale_with_alpha_but_never_below_k() -> None:
    assert scale_widths([16, 16, 8], 1.0, 4) == [16, 16, 8, 8]
    assert scale_widths([16, 16, 8], 0.25, 4) == [4, 4, 2, 2]
    assert scale_widths([16, 16, 8], 0.25, 4, k=5) == [5, 5, 5, 5]
    assert scale_widths([16, 4, 8], 1.0, 3, k=10) == [16, 10, 10]
    assert scale_widths([16], 0.01, 2, min_width=2) == [2, 2]


def test_controller_narrows_beams_before_it_refuses() -> None:
    c = BeamController([16, 16, 8], slo_s=0.05, alpha_min=0.125, max_batch=8, hold_s=0.0)
    assert c.admit(100)       # full width: never refuse, narrow first
    for _ in range(20):
        c.observe(8, 0.04, 0.05, 64)           # latency above the SLO
    assert c.at_floor and c.alpha == 0.125
    assert not c.admit(1000)                   # at the floor and the backlog exceeds the SLO
    assert c.admit(0)                          # an empty queue is never refused
    for _ in range(100):
        c.observe(1, 0.001, 0.0, 0)            # calm: widen again
    assert c.alpha == 1.0
    fixed = BeamController([16], slo_s=0.05, dynamic=False, max_queue=10)
    fixed.observe(8, 1.0, 1.0, 9)
    assert fixed.alpha == 1.0 and fixed.admit(9) and not fixed.admit(10)
