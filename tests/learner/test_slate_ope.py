"""Slate estimators on small synthetic logs whose truth is known analytically (fixed
seeds): unbiasedness of PI and IPS under additive rewards, self-normalisation, DR with a
perfect reward model, the influence-function intervals and the ridge reward model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from learner.slate_ope import (
    SLATE_ESTIMATORS,
    ItemCodes,
    RidgeRewardModel,
    SlateLog,
    bootstrap_interval,
    cross_fit,
    effective_sample_size,
    estimate,
    influence,
    interval,
    match_share,
    normal_interval,
    pi_weights_uniform,
    score_interval,
    second_moment_scale,
    slate_weights,
)

M, K = 6, 3
"""Ads and slots of the synthetic world."""


def _phi(seed: int = 0) -> np.ndarray:
    """[K, M] expected reward of ad a at slot j (additive slates)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, (K, M)) * np.array([[1.0], [0.7], [0.5]])


def _all_slates() -> list[tuple[int, ...]]:
    return list(itertools.permutations(range(M), K))


def _exact_log(target: tuple[int, ...], phi: np.ndarray, rhat: np.ndarray | None = None
               ) -> tuple[SlateLog, np.ndarray]:
    """Every slate of the uniform logger once (the exact expectation over the logger)
    with its expected rewards; and the probability weights (uniform)."""
    slates = _all_slates()
    n = len(slates)
    reward = np.array([[phi[j, a] for j, a in enumerate(s)] for s in slates])
    pi = np.array([[1.0 if a == target[j] else 0.0 for j, a in enumerate(s)] for s in slates])
    cross = np.array([sum(1 for j, a in enumerate(s) if a in target and a != target[j])
                      for s in slates], float)
    rh = rhat if rhat is not None else np.zeros((K, M))
    predicted = np.array([[rh[j, a] for j, a in enumerate(s)] for s in slates])
    direct = np.full(n, sum(rh[j, a] for j, a in enumerate(target)))
    log = SlateLog(reward, np.full((n, K), 1.0 / M), pi, np.ones((n, K), bool), predicted,
                   direct, np.full(n, float(M)), cross)
    return log, np.full(n, 1.0 / n)


def _truth(target: tuple[int, ...], phi: np.ndarray) -> float:
    return float(sum(phi[j, a] for j, a in enumerate(target)))


@pytest.mark.parametrize("name", ["ips", "pi", "dr", "dr_pi"])
def test_unbiased_estimators_average_to_the_truth_over_every_logged_slate(name: str) -> None:
    """Under additive rewards and the uniform logger, E[estimate] is the target's value
    exactly (the mean over every possible logged slate, each equally likely)."""
    phi = _phi(1)
    rhat = _phi(7)                                    # a wrong reward model: still unbiased
    for target in [(0, 1, 2), (5, 3, 1), (2, 0, 4)]:
        log, _ = _exact_log(target, phi, rhat)
        _, psi = influence(log, name)
        assert float(psi.mean()) == pytest.approx(_truth(target, phi), abs=1e-12)


def test_pi_weights_uniform_match_the_pseudo_inverse_of_the_slot_ad_moment_matrix() -> None:
    slates = _all_slates()

    def onehot(s: tuple[int, ...]) -> np.ndarray:
        v = np.zeros(K * M)
        for j, a in enumerate(s):
            v[j * M + a] = 1.0
        return v

    x = np.array([onehot(s) for s in slates])
    gamma_pinv = np.linalg.pinv(x.T @ x / len(slates))
    target = (4, 0, 2)
    exact = x @ gamma_pinv @ onehot(target)
    log, _ = _exact_log(target, _phi())
    assert slate_weights(log) == pytest.approx(exact, abs=1e-9)
    assert float(exact.mean()) == pytest.approx(1.0)   # the weights have mean 1
    assert pi_weights_uniform(np.array([10.0]), np.array([1.0]), np.array([1.0]),
                              np.array([0.0]))[0] == pytest.approx(10.0)   # one slot: m


def test_factored_pi_weights_are_the_sum_of_slot_weights_minus_k_minus_one() -> None:
    w = np.array([[1.0, 1.0, 0.0]])
    log = SlateLog(np.zeros((1, 3)), np.array([[1.0, 1.0, 0.05]]), w,
                   np.ones((1, 3), bool), np.zeros((1, 3)), np.zeros(1))
    assert slate_weights(log)[0] == pytest.approx(2.0 - 2.0)


def _sampled_log(n: int, seed: int, target: tuple[int, ...], phi: np.ndarray,
                 rhat: np.ndarray) -> SlateLog:
    """n uniform slates with Bernoulli rewards of mean phi."""
    rng = np.random.default_rng(seed)
    slates = np.array([rng.permutation(M)[:K] for _ in range(n)])
    p = phi[np.arange(K), slates]
    reward = (rng.random((n, K)) < p).astype(float)
    pi = (slates == np.array(target)).astype(float)
    cross = np.array([sum(1 for j, a in enumerate(s) if a in target and a != target[j])
                      for s in slates], float)
    predicted = rhat[np.arange(K), slates]
    direct = np.full(n, sum(rhat[j, a] for j, a in enumerate(target)))
    return SlateLog(reward, np.full((n, K), 1.0 / M), pi, np.ones((n, K), bool), predicted,
                    direct, np.full(n, float(M)), cross)


def test_self_normalised_weights_sum_to_the_log_and_reproduce_a_constant_reward() -> None:
    phi = np.full((K, M), 1.0)                         # every item always rewards 1
    log = _sampled_log(500, 3, (0, 1, 2), phi, np.zeros((K, M)))
    # a constant reward per slot is estimated exactly by the self-normalised forms,
    # not by the plain ones (their weights average 1 only in expectation)
    assert influence(log, "snips")[0] == pytest.approx(K)
    assert influence(log, "snpi")[0] == pytest.approx(K)
    assert influence(log, "ips")[0] != pytest.approx(K)
    w = log.weight
    for j in range(K):
        sn = w[:, j] / w[:, j].sum()
        assert sn.sum() == pytest.approx(1.0)


def test_dr_with_a_perfect_reward_model_has_no_variance_from_the_model_part() -> None:
    phi = _phi(2)
    target = (1, 3, 5)
    log = _sampled_log(4000, 4, target, phi, rhat=phi)
    # the direct term is the truth in every impression: all variance is reward noise
    assert np.ptp(log.direct) == 0.0 and log.direct[0] == pytest.approx(_truth(target, phi))
    _, psi = influence(log, "dr")
    w, r = log.weight, log.reward
    noise = (w * (r - log.predicted)).sum(axis=1)
    assert psi - log.direct == pytest.approx(noise)
    # and DR is then far tighter than IPS, whose weights multiply the whole reward
    assert np.var(psi) < np.var(influence(log, "ips")[1])
    # with noiseless rewards (r = r̂ = φ) DR has zero variance
    exact = SlateLog(log.predicted, log.propensity, log.target, log.mask, log.predicted,
                     log.direct)
    assert np.var(influence(exact, "dr")[1]) == pytest.approx(0.0, abs=1e-20)


def test_influence_intervals_cover_the_truth_at_about_their_level() -> None:
    phi = _phi(5)
    target = (0, 2, 4)
    truth = _truth(target, phi)
    hits = {name: 0 for name in ("ips", "pi", "dr", "snips")}
    reps = 200
    for rep in range(reps):
        log = _sampled_log(600, 100 + rep, target, phi, rhat=np.full((K, M), 0.4))
        est = estimate(log, list(hits))
        for name in hits:
            hits[name] += est[name]["low"] <= truth <= est[name]["high"]
    for name, h in hits.items():
        assert 0.88 <= h / reps <= 0.99, (name, h / reps)


def test_bootstrap_interval_brackets_the_estimate() -> None:
    log = _sampled_log(400, 9, (0, 1, 2), _phi(), np.zeros((K, M)))
    lo, hi = bootstrap_interval(log, "dr", samples=100, seed=1)
    v = influence(log, "dr")[0]
    assert lo < v < hi


def test_every_estimator_runs_and_diagnostics_describe_the_overlap() -> None:
    log = _sampled_log(300, 11, (0, 1, 2), _phi(), np.zeros((K, M)))
    est = estimate(log)
    assert list(est) == list(SLATE_ESTIMATORS)
    assert all(np.isfinite(v["value"]) and v["low"] <= v["high"] for v in est.values())
    items, imps = match_share(log)
    assert items == pytest.approx(log.target.mean())
    assert 0 < items < imps < 1
    # per slot ~ n / M matched items of weight M: the ESS is the matched count
    assert effective_sample_size(log) == pytest.approx(log.target.sum(axis=0).mean())
    with pytest.raises(ValueError, match="unknown estimator"):
        influence(log, "nope")


def test_ridge_reward_model_learns_a_context_by_attribute_effect_and_position_factor() -> None:
    rng = np.random.default_rng(0)
    n, k = 3000, 3
    ctx = rng.integers(0, 2, (n, 1))                 # one context key, two values
    attrs = np.array([[0], [1], [0], [1]])           # four ads, two kinds
    theta = np.array([1.0, 0.6, 0.3])
    ad = rng.integers(0, 4, (n, k))
    base = np.where(ctx == attrs[ad, 0], 1.0, 0.2)   # the kind that suits the context
    y = base * theta + rng.normal(0, 0.05, (n, k))
    items = ItemCodes(np.repeat(np.arange(n), k), ad.ravel(), np.tile(np.arange(k), n))
    model = RidgeRewardModel([2], [2], 4, l2=1.0).fit(ctx, attrs, items, y.ravel())
    pred = model.predict(ctx, attrs, items).reshape(n, k)
    assert np.abs(pred - base * theta).max() < 0.1
    assert model.theta == pytest.approx(theta, abs=0.05)
    (cf,) = cross_fit(ctx, attrs, items, y.ravel(), [], n, folds=2, seed=5,
                      make=lambda: RidgeRewardModel([2], [2], 4, l2=1.0))
    assert np.abs(cf.reshape(n, k) - base * theta).max() < 0.12


def _rare_reward_log(rng: np.random.Generator, n: int, m: int = 50, unit: float = 40.0,
                     rate: float = 0.01) -> tuple[SlateLog, float]:
    """One slot, a uniform logger over ``m`` ads, a target that always serves ad 0, whose
    reward is ``unit`` with probability ``rate`` (the rare large conversion); the other
    ads pay 0 or 1 at rate 0.05. Returns the log and the target's true value."""
    ads = rng.integers(0, m, n)
    pays = np.where(ads == 0, unit, 1.0)
    rates = np.where(ads == 0, rate, 0.05)
    reward = np.where(rng.random(n) < rates, pays, 0.0)[:, None]
    target = (ads == 0).astype(float)[:, None]
    predicted = (pays * rates)[:, None]
    log = SlateLog(reward, np.full((n, 1), 1.0 / m), target, np.ones((n, 1), bool),
                   predicted, np.full(n, unit * rate), unit=pays[:, None])
    return log, unit * rate


def test_score_interval_covers_rare_large_rewards_where_the_normal_interval_collapses(
        ) -> None:
    rng = np.random.default_rng(11)
    normal = score = 0
    trials = 300
    for _ in range(trials):
        log, truth = _rare_reward_log(rng, 4000)
        v, psi = influence(log, "ips")
        lo, hi = normal_interval(v, psi)
        normal += lo <= truth <= hi
        bounds = score_interval(v, second_moment_scale(log), log.n)
        assert bounds is not None
        score += bounds[0] <= truth <= bounds[1]
    assert score / trials >= 0.9
    assert normal / trials < 0.8        # about 0.4 expected conversions of the target's ad


def test_second_moment_scale_is_the_weighted_pay_unit_and_unknown_without_units() -> None:
    log, _ = _rare_reward_log(np.random.default_rng(3), 20000)
    assert second_moment_scale(log) == pytest.approx(50 * 40.0)
    assert np.isnan(second_moment_scale(SlateLog(
        log.reward, log.propensity, log.target, log.mask, log.predicted, log.direct)))
    revised = SlateLog(log.reward, log.propensity, log.target, log.mask, log.predicted,
                       log.direct, unit=log.unit * 2.0)      # every bid doubled since
    matched = log.target[:, 0] > 0
    paid_at = np.where(log.reward[matched, 0] > 0, log.reward[matched, 0], 80.0)
    assert (log.reward[matched, 0] > 0).any()               # some count at what they paid
    assert second_moment_scale(revised) == pytest.approx(50 * paid_at.mean())
    unmatched = SlateLog(log.reward, log.propensity, np.zeros_like(log.target), log.mask,
                         log.predicted, log.direct, unit=log.unit)
    assert np.isnan(second_moment_scale(unmatched))


def test_score_interval_has_a_positive_upper_bound_at_an_estimate_of_zero() -> None:
    bounds = score_interval(0.0, 2000.0, 4000)
    assert bounds is not None
    lo, hi = bounds
    assert lo == 0.0 and hi == pytest.approx(1.96 ** 2 * 2000.0 / 4000 / (1 + 1.96 ** 2 / 4000),
                                             rel=1e-3)
    assert score_interval(-0.1, 2000.0, 4000) is None
    assert score_interval(0.5, float("nan"), 4000) is None


def test_reported_interval_is_the_hull_of_the_score_and_normal_intervals() -> None:
    log, _ = _rare_reward_log(np.random.default_rng(5), 4000)
    v, psi = influence(log, "ips")
    lo, hi = interval(log, "ips", v, psi)
    nlo, nhi = normal_interval(v, psi)
    bounds = score_interval(v, second_moment_scale(log), log.n)
    assert bounds is not None
    assert lo == min(nlo, bounds[0]) and hi == max(nhi, bounds[1])
    assert interval(log, "dm", *influence(log, "dm")) == normal_interval(*influence(log, "dm"))
