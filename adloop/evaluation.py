"""Closed-loop evaluation: every policy fed the same simulated traffic, side by side.

For each seed a :class:`traffic.world.World` is built, a logging phase serves
uniformly random slates (the logs pretrain the generative model, once per seed, shared
by every generative policy), then each policy starts from a copy of the world after the
logging phase and serves the *same* request stream (same users, contexts and arrival
times). The design is paired (common random numbers, :mod:`traffic.world`): the
catalogue and its lifecycle do not depend on what was served, and the response to an
ad shown to a request is keyed by the two, so two policies showing the same ad to the
same request see the same click and conversion; only what the slates cause (spend,
fatigue, the users' clicked-ad history) differs. Learning policies receive the final
feedback of each block of ``update_every`` requests at the end of that block (a delay
of up to one block, standing in for the joiner's attribution window; the live stack of
``adloop demo`` runs the real delayed path).

Reported per policy (mean and 95 % interval over seeds, Student t):

* **RPM**: revenue per mille impressions, 1000·Σ expected revenue / impressions,
  where expected revenue is the ground-truth expected value of each shown ad (the
  realized revenue, which adds sampling noise, is reported beside it);
* CTR, CVR (conversions per click), regret vs the oracle (expected revenue the
  oracle would have made minus the policy's, summed over the run) and vs the
  observable oracle (the same against :meth:`World.observable_oracle_slate`, the best
  slate given only the request's observables: context, age band, declared interest
  and recent organic items);
* **cold-start share**: revenue from ads created after pretraining;
* beyond accuracy (:mod:`learner.beyond` has the definitions): **catalogue coverage**
  (share of the ads created by the end that were shown at least once), **slate
  diversity** (distinct categories per slate / its length), **SID diversity** (share of
  a slate's ad pairs in different semantic-ID level-0 clusters, the codes of the
  pretrained tokenizer, for every policy alike), **novelty** as the share of shown ads
  the user had not been shown before (in the logs or earlier in the run) and in bits
  (mean -log2 of a shown ad's smoothed share of the logs' clicks: higher shows less of
  what was already popular), and **personalization** (1 - mean Jaccard overlap of the
  slates of two different users, 2000 seeded pairs);
* latency: wall time of ``recommend_batch`` per request.

The headline window is the last quarter of the run, when learning policies have
adapted; the whole run is reported beside it. Each ratio of :data:`RATIO_PAIRS` (e.g.
``rspo_over_frozen``) is the ratio of the two policies' mean RPM over seeds with a
paired 95 % interval from the per-seed pairs (delta method on the log ratio,
:func:`paired_ratio`) and ``mde_<ratio>``, the relative effect the run detects at 80 %
power (two-sided 5 %). The generative policies live in :mod:`adloop.policies` (imported lazily) and
are served by the server's own code in-process (:mod:`adloop.inprocess`: the learner's
ONNX export, the server's model manager, trie and beam search, batched, no HTTP and no
Kafka), so the harness measures what ``adloop serve`` would answer.

Size: ``EvalConfig``'s defaults are 8 seeds × 40 000 requests per policy (~14 simulated
days after the logs); ``bench/closed_loop.py --quick`` is 8 seeds × 1 600 (the MDE a
size reaches: docs/benchmarks.md, Paired design). Seeds share nothing and run in
parallel worker processes (``compare(jobs=N)``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from learner.beyond import beyond_accuracy, click_bits
from server.exposure import ExposureCounter
from streams.logs import configure_logging, get_logger
from streams.schemas import Feedback, FeedbackItem, OrganicFeedbackItem
from traffic.driver import OraclePolicy, RandomPolicy, ServedAd, ServedSlate
from traffic.world import OrganicResponse, Request, Response, World, WorldConfig

log = get_logger(__name__)

POLICIES = ("rspo", "frozen", "frozen_explore", "vsl_only", "dlrm", "logistic", "vw_cb",
            "bid_only", "popularity", "random", "observable_oracle", "oracle")
GENERATIVE = ("rspo", "frozen", "frozen_explore", "vsl_only")
"""Policies served by the pretrained generative model."""
BASELINES = ("logistic", "dlrm", "vw_cb")
"""The learned non-generative yardsticks; ``best_baseline`` is the best of them by RPM."""
# two-sided 95 % Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}
Z975 = 1.959963984540054
"""Standard normal quantile at 0.975 (two-sided 5 % test)."""
Z80 = 0.8416212335729143
"""Standard normal quantile at 0.80 (80 % power)."""
RATIO_PAIRS = (("rspo", "frozen"), ("rspo", "best_baseline"), ("rspo", "frozen_explore"),
               ("rspo", "dlrm"), ("rspo", "logistic"), ("rspo", "vw_cb"),
               ("rspo", "vsl_only"), ("rspo", "observable_oracle"), ("rspo", "oracle"),
               ("observable_oracle", "oracle"))
"""The ratios ``aggregate`` reports (each skipped when either policy did not run)."""


class BatchPolicy(Protocol):
    name: str

    def recommend_batch(self, requests: Sequence[Request]) -> list[ServedSlate]: ...

    def learn(self, lists: Sequence[Feedback]) -> dict[str, float]: ...


class ObservableOraclePolicy:
    """The best slate given only what the models see (:meth:`World.observable_oracle_slate`)."""

    name = "observable_oracle"

    def __init__(self, world: World) -> None:
        self.world = world

    def recommend(self, request: Request) -> ServedSlate:
        ids = self.world.observable_oracle_slate(request)
        return ServedSlate(request.request_id, self.name,
                           [ServedAd(a, i) for i, a in enumerate(ids)])


class _Single:
    """Adapts a one-request policy (oracles, random) to the batch contract."""

    def __init__(self, name: str,
                 policy: OraclePolicy | RandomPolicy | ObservableOraclePolicy) -> None:
        self.name, self.policy = name, policy

    def recommend_batch(self, requests: Sequence[Request]) -> list[ServedSlate]:
        return [self.policy.recommend(r) for r in requests]

    def learn(self, lists: Sequence[Feedback]) -> dict[str, float]:
        return {}


@dataclass
class EvalConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    requests: int = 40000
    """Requests per policy and seed in the evaluation phase (~14 simulated days)."""
    log_requests: int = 4000
    """Requests of the random logging phase (the pretraining data)."""
    n_users: int = 400
    n_ads: int = 150
    slate_size: int = 5
    request_rate: float = 1.0 / 30.0
    """Requests per simulated second (lifecycle and drift advance with simulated time):
    one every 30 s, so 2500 logging requests span ~21 simulated hours and 1600
    evaluation requests the ~13 hours after them, which the logs never saw."""
    new_ads_per_hour: float = 10.0
    batch: int = 32
    update_every: int = 64
    buckets: int = 16
    pretrain_steps: int = 400
    encoder: str = "minilm"
    beam_width: int = 128
    explore: float = 0.05
    """Share of a learning policy's requests whose last slot explores a low-exposure ad."""
    catalogue_beams: bool = True
    """Beam width at every level, level 0 whole for a small catalogue (False: level 0
    capped at 16, the earlier rule; for ablations)."""
    value_own_items: bool = True
    """The value head has its own item table (False: shared; for ablations)."""
    trie_logprobs: bool = True
    """RSPO's log-probs renormalized over the servable trie, as served (False: over each
    level's whole vocabulary; for ablations)."""
    value_priors: bool = False
    """The value head's empirical-Bayes priors per (industry, goal) (True: the variant,
    off by default as in pretraining; ``PretrainSettings.value_priors``)."""
    organic_slots: int = 0
    """Organic items (videos, articles) per request in a mixed feed (0: ads only). With
    slots, the generative policies serve organic items from the shared id space, the
    tokenizer is fitted on the world's organic catalogue too, and the run reports the
    organic items' true expected engagement against the organic oracle's."""
    hepo_weight: float = 0.0
    """Weight of the HEPO term over sibling beams (:func:`learner.rspo.hepo_loss`) for
    the learning policies, as the live learner's ``--hepo-weight`` (0: off)."""
    rspo: dict[str, Any] = field(default_factory=dict)
    """Overrides of :class:`learner.rspo.RSPOConfig` for the learning policies (a
    ``hepo_weight`` here wins over the field above)."""
    pretrain: dict[str, Any] = field(default_factory=dict)
    """Overrides of :class:`learner.pretrain.PretrainSettings` (model shape and
    pretraining losses, e.g. ``task_tokens``, ``dc_weight``; for ablations)."""
    score_catalogue_max: int | None = None
    """The generative policies score a servable catalogue of at most this many ads whole
    instead of searching it by beams (None: ``adloop serve``'s setting,
    ``ServerSettings.score_catalogue_max``; 0: always beams, the earlier form)."""
    policies: tuple[str, ...] = POLICIES
    threads: int = 0
    """torch and ONNX Runtime threads of a seed worker (0: the library defaults; 1 in
    worker processes)."""


@dataclass
class PolicyRun:
    policy: str
    seed: int
    impressions: list[int] = field(default_factory=list)
    revenue: list[float] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    oracle_expected: list[float] = field(default_factory=list)
    observable_expected: list[float] = field(default_factory=list)
    """Per bucket: true expected revenue the observable oracle's slates would have made."""
    clicks: list[int] = field(default_factory=list)
    conversions: list[int] = field(default_factory=list)
    organic_items: list[int] = field(default_factory=list)
    """Per bucket: organic items shown (mixed feeds only)."""
    organic_expected: list[float] = field(default_factory=list)
    """Per bucket: their true expected engagement, P(view) · (1 + P(like | view))."""
    organic_oracle_expected: list[float] = field(default_factory=list)
    """Per bucket: the organic oracle's for the same requests."""
    organic_views: int = 0
    organic_likes: int = 0
    organic_dwell_s: float = 0.0
    cold_revenue: float = 0.0
    total_revenue: float = 0.0
    latency_s: list[float] = field(default_factory=list)
    model_versions: int = 0
    catalogue_size: int = 0
    """Ads the world had created by the end of the run."""
    beyond: dict[str, float] = field(default_factory=dict)
    """Beyond-accuracy metrics of the run's slates (:func:`learner.beyond.beyond_accuracy`:
    catalogue coverage, slate and SID diversity, novelty unseen and in bits,
    personalization)."""
    offline: dict[str, float] = field(default_factory=dict)
    """Held-out metrics of the policy's pretrained model (recall@K, vNDCG@K on the
    latest logged requests), for generative policies."""
    serving: dict[str, float] = field(default_factory=dict)
    """What a generative policy reports about its serving (``calibration()``: ECE of
    pCTR and pCVR, mean candidate coverage, share of requests with an exploration slot)
    and a policy's value model's held-out figures (``heldout_metrics()``:
    ``value_logloss_ctr``, ``value_logloss_cvr`` on the latest logged requests)."""

    def window(self, frac: float = 0.25) -> slice:
        n = len(self.impressions)
        return slice(n - max(1, round(n * frac)), n)

    def rpm(self, sl: slice | None = None, realized: bool = False) -> float:
        sl = sl or slice(None)
        rev = sum((self.revenue if realized else self.expected)[sl])
        imp = sum(self.impressions[sl])
        return 1000.0 * rev / imp if imp else 0.0

    def first(self, frac: float = 0.25) -> slice:
        return slice(0, max(1, round(len(self.impressions) * frac)))

    def organic_summary(self) -> dict[str, float]:
        """Mixed-feed metrics (empty without organic items): last-quarter true expected
        engagement per organic item and its ratio to the organic oracle's, and the
        realized view rate, like rate and dwell per item over the run."""
        n = sum(self.organic_items)
        if not n:
            return {}
        last = self.window()
        shown = sum(self.organic_items[last])
        oracle = sum(self.organic_oracle_expected[last])
        return {
            "organic_engagement_last_quarter": (sum(self.organic_expected[last]) / shown
                                                if shown else 0.0),
            "organic_oracle_ratio_last_quarter": (sum(self.organic_expected[last]) / oracle
                                                  if oracle else 0.0),
            "organic_view_rate": self.organic_views / n,
            "organic_like_rate": self.organic_likes / n,
            "organic_dwell_s_per_item": self.organic_dwell_s / n,
        }

    def summary(self) -> dict[str, float]:
        last = self.window()
        imp, clk = sum(self.impressions), sum(self.clicks)
        return {
            "rpm_last_quarter": self.rpm(last),
            "rpm_first_quarter": self.rpm(self.first()),
            "rpm_realized_last_quarter": self.rpm(last, realized=True),
            "rpm_all": self.rpm(),
            "ctr": clk / imp if imp else 0.0,
            "cvr": sum(self.conversions) / clk if clk else 0.0,
            "regret": sum(self.oracle_expected) - sum(self.expected),
            "regret_vs_observable_oracle": sum(self.observable_expected) - sum(self.expected),
            "cold_start_revenue_share": (self.cold_revenue / self.total_revenue
                                         if self.total_revenue else 0.0),
            "latency_ms_per_request": 1000.0 * statistics.mean(self.latency_s)
            if self.latency_s else 0.0,
            "model_versions": float(self.model_versions),
            **self.organic_summary(),
            **self.beyond,
            **self.serving,
            **{"offline_" + k.replace("@", "_at_"): v for k, v in self.offline.items()},
        }


def feedback_of(request: Request, slate: ServedSlate, response: Response,
                world: World, organic: OrganicResponse | None = None) -> Feedback:
    """The final feedback list the joiner would emit for this request (with the final
    beams the slate was ranked from, when the policy reports them, as the server logs
    them and the joiner copies them, and the mixed feed's organic items with what the
    user did with them, ``organic``)."""
    by_id = {o.ad_id: o for o in response.items}
    items = []
    for a in slate.ads:
        o = by_id.get(a.ad_id)
        ad = world.ads.get(a.ad_id)
        if o is None or ad is None:
            continue
        items.append(FeedbackItem(
            ad_id=a.ad_id, semantic_id=list(a.semantic_id), position=a.position,
            score=a.score, bid=ad.record.bid, bid_type=ad.record.bid_type, clicked=o.clicked,
            converted=o.converted, conversion_value=o.conversion_value, reward=o.reward,
            exposure=a.exposure))
    window = world.config.delays.window_s
    return Feedback(request_id=request.request_id, user_id=request.user_id, kind="final",
                    revision=0, impression_time=request.event_time,
                    event_time=request.event_time + window, elapsed_s=window,
                    window_closed=True, context=dict(request.context),
                    recent_ad_ids=list(reversed(request.recent_ad_ids)),
                    recent_organic=list(request.recent_organic),
                    model_version=slate.model_version, items=items,
                    beams=list(slate.beams), organic=organic_feedback(slate, organic))


def organic_feedback(slate: ServedSlate, response: OrganicResponse | None
                     ) -> list[OrganicFeedbackItem]:
    """The joined organic items of a mixed feed (the joiner's ``Feedback.organic``)."""
    if response is None:
        return []
    by_id = {o.item_id: o for o in response.items}
    out = []
    for o in sorted(slate.organic, key=lambda o: o.position):
        r = by_id.get(o.item_id)
        out.append(OrganicFeedbackItem(
            item_id=o.item_id, semantic_id=list(o.semantic_id), position=o.position,
            score=o.score, viewed=bool(r and r.viewed), liked=bool(r and r.liked),
            dwell_s=r.dwell_s if r else 0.0))
    return out


def serve_organic(world: World, req: Request, slate: ServedSlate) -> OrganicResponse | None:
    """The user's response to the slate's organic items (None for an ads-only request)."""
    if req.organic_k <= 0:
        return None
    return world.respond_organic(req, slate.organic_ids())


def world_config(cfg: EvalConfig, seed: int) -> WorldConfig:
    return WorldConfig(seed=seed, n_users=cfg.n_users, n_ads=cfg.n_ads,
                       slate_size=cfg.slate_size, request_rate=cfg.request_rate,
                       new_ads_per_hour=cfg.new_ads_per_hour, organic_slots=cfg.organic_slots)


def with_exposure(counter: ExposureCounter, user_id: str, slate: ServedSlate) -> ServedSlate:
    """``slate`` with each ad's earlier impressions to the user as ``counter`` has them
    (what a server writes on the impression), then counted."""
    ids = slate.ad_ids()
    seen = counter.counts(user_id, ids)
    counter.record(user_id, ids)
    return dataclasses.replace(slate, ads=[dataclasses.replace(a, exposure=float(n))
                                           for a, n in zip(slate.ads, seen, strict=True)])


def logging_phase(world: World, cfg: EvalConfig, seed: int) -> list[Feedback]:
    """Serve ``log_requests`` random slates; return their feedback (the pretraining log,
    with the exposure a server serving them would have counted)."""
    policy = RandomPolicy(world, seed)
    counter = ExposureCounter()
    out = []
    for _ in range(cfg.log_requests):
        req = world.next_request()
        world.advance_to(req.event_time)
        slate = with_exposure(counter, req.user_id, policy.recommend(req))
        resp = world.respond(req, slate.ad_ids())
        out.append(feedback_of(req, slate, resp, world, serve_organic(world, req, slate)))
    return out


def run_policy(world: World, policy: BatchPolicy, cfg: EvalConfig, seed: int,
               cold_after: float, progress: Callable[[str], None] | None = None,
               novelty: Callable[[str], float] | None = None,
               prior: Mapping[str, Iterable[str]] | None = None,
               prefixes: Callable[[World], Mapping[str, Hashable]] | None = None) -> PolicyRun:
    """Serve ``cfg.requests`` requests with ``policy``; learn every ``update_every``.

    Beyond-accuracy metrics of the shown slates (:mod:`learner.beyond`): ``novelty(ad_id)``
    the bits a shown item adds to ``novelty_bits``; ``prior`` the ads each user was shown
    before the run (``novelty_unseen``); ``prefixes(world)`` each ad's semantic-ID level-0
    code at the end of the run (``sid_diversity``; an ad without one is its own)."""
    run = PolicyRun(policy.name, seed)
    users: list[str] = []
    shown: list[list[str]] = []
    per_bucket = max(1, cfg.requests // cfg.buckets)
    pending: list[Feedback] = []
    served = 0
    bucket: dict[str, float] = {"imp": 0, "rev": 0.0, "exp": 0.0, "orc": 0.0, "obs": 0.0,
                                "clk": 0, "cv": 0, "org": 0, "org_exp": 0.0, "org_orc": 0.0}

    def close_bucket() -> None:
        run.impressions.append(int(bucket["imp"]))
        run.revenue.append(bucket["rev"])
        run.expected.append(bucket["exp"])
        run.oracle_expected.append(bucket["orc"])
        run.observable_expected.append(bucket["obs"])
        run.clicks.append(int(bucket["clk"]))
        run.conversions.append(int(bucket["cv"]))
        run.organic_items.append(int(bucket["org"]))
        run.organic_expected.append(bucket["org_exp"])
        run.organic_oracle_expected.append(bucket["org_orc"])
        bucket.update(imp=0, rev=0.0, exp=0.0, orc=0.0, obs=0.0, clk=0, cv=0, org=0,
                      org_exp=0.0, org_orc=0.0)

    while served < cfg.requests:
        n = min(cfg.batch, cfg.requests - served)
        reqs = world.step_requests(n)
        world.advance_to(reqs[-1].event_time)
        t0 = time.perf_counter()
        slates = policy.recommend_batch(reqs)
        dt = (time.perf_counter() - t0) / n
        for req, slate in zip(reqs, slates, strict=True):
            run.latency_s.append(dt)
            bucket["orc"] += _slate_value(world, req, world.oracle_slate(
                req.user_id, req.context, k=req.k, t=req.event_time))
            bucket["obs"] += _slate_value(world, req, world.observable_oracle_slate(req))
            resp = world.respond(req, slate.ad_ids())
            bucket["imp"] += resp.impressions
            bucket["rev"] += resp.reward
            bucket["exp"] += resp.expected_value
            bucket["clk"] += sum(o.clicked for o in resp.items)
            bucket["cv"] += sum(o.converted for o in resp.items)
            users.append(req.user_id)
            shown.append([o.ad_id for o in resp.items])
            for o in resp.items:
                run.total_revenue += o.reward
                if world.ads[o.ad_id].record.created_time > cold_after:
                    run.cold_revenue += o.reward
            if req.organic_k > 0:   # the oracle before the feed joins the history
                best = world.organic_oracle(req)
                bucket["org_orc"] += float(world.organic_expected_engagement(req, best).sum())
            organic = serve_organic(world, req, slate)
            if organic is not None:
                bucket["org"] += organic.impressions
                bucket["org_exp"] += organic.expected_engagement
                run.organic_views += organic.views
                run.organic_likes += organic.likes
                run.organic_dwell_s += organic.dwell_s
            pending.append(feedback_of(req, slate, resp, world, organic))
            served += 1
            if served % per_bucket == 0 and len(run.impressions) < cfg.buckets:
                close_bucket()
            if served % cfg.update_every == 0:
                policy.learn(pending)
                pending = []
        if progress and served % (per_bucket * 4) < n:
            progress(f"{policy.name} seed {seed}: {served}/{cfg.requests} requests")
    if bucket["imp"] and len(run.impressions) < cfg.buckets:
        close_bucket()
    run.catalogue_size = len(world.ads)
    prefix = prefixes(world) if prefixes is not None else None
    run.beyond = beyond_accuracy(
        users, shown, servable=run.catalogue_size, category_of=lambda a: world.ads[a].category,
        prefix_of=(lambda a: prefix.get(a, a)) if prefix is not None else None,
        bits=novelty, prior=prior, seed=seed)
    versions = getattr(policy, "version", 1)
    run.model_versions = int(versions)
    calibration = getattr(policy, "calibration", None)
    if callable(calibration):
        run.serving = dict(calibration())
    heldout = getattr(policy, "heldout_metrics", None)
    if callable(heldout):       # a value model's held-out log-loss on the logs' time split
        run.serving.update(heldout())
    return run


def _slate_value(world: World, req: Request, ids: Sequence[str]) -> float:
    """True expected revenue of ``ids`` shown to ``req`` (positions included)."""
    if not ids:
        return 0.0
    import numpy as np

    ads = [world.ads[a] for a in ids]
    _, pctr, pcvr = world.probabilities(req.user_id, req.context, req.event_time, ads,
                                        positions=np.arange(len(ads)))
    return float(world.expected_values(ads, pctr, pcvr).sum())


def make_policy(name: str, world: World, seed: int, cfg: EvalConfig,
                pretrained: Any, logs: Sequence[Feedback] = (),
                work_dir: Path | None = None) -> BatchPolicy:
    """A policy by name; the non-generative learners start from the same logs
    (``logs``: the logging phase) as the generative model's pretraining. A generative
    policy keeps its snapshots under ``work_dir`` (a temporary directory when None)."""
    if name == "oracle":
        return _Single("oracle", OraclePolicy(world))
    if name == "observable_oracle":
        return _Single("observable_oracle", ObservableOraclePolicy(world))
    if name == "random":
        return _Single("random", RandomPolicy(world, seed + 1000))
    from adloop import policies

    if name == "popularity":
        pop = policies.PopularityPolicy(world)
        pop.learn(logs)
        return pop
    if name == "bid_only":
        bid = policies.BidOnlyPolicy(world)
        bid.fit(logs)
        return bid
    if name == "dlrm":
        dlrm = policies.DLRMPolicy(world, seed=seed)
        dlrm.pretrain(logs)
        return dlrm
    if name in ("logistic", "vw_cb"):
        from adloop import baselines

        base: baselines.LogisticPolicy | baselines.VWPolicy = (
            baselines.LogisticPolicy(world, seed=seed) if name == "logistic"
            else baselines.VWPolicy(world, seed=seed, epsilon=cfg.explore))
        base.pretrain(logs)
        return base
    update = {"rspo": "rspo", "frozen": "none", "frozen_explore": "none",
              "vsl_only": "vsl_only"}[name]
    from learner.rspo import RSPOConfig

    model, tok, _ = pretrained
    gen = policies.GenerativePolicy(name, world, model, tok, update=update,
                                     beam_width=cfg.beam_width, seed=seed,
                                     explore=(cfg.explore if update != "none"
                                              or name == "frozen_explore" else 0.0),
                                     catalogue_beams=cfg.catalogue_beams,
                                     rspo=RSPOConfig(**{"hepo_weight": cfg.hepo_weight,
                                                        **cfg.rspo}), work_dir=work_dir,
                                     threads=cfg.threads, trie_logprobs=cfg.trie_logprobs,
                                     heldout=pretrained[2],
                                     score_catalogue_max=cfg.score_catalogue_max)
    gen.server.exposure.record_feedback(logs)   # the server saw the logs' impressions
    return gen


def pretrain_on(log_feedback: list[Feedback], world: World, cfg: EvalConfig, seed: int,
                run_dir: Path) -> tuple[Any, Any, dict[str, float]]:
    """Pretrain the generative model on the logging phase (VSL + MTP): the model, its
    tokenizer and its held-out metrics."""
    from learner.pretrain import PretrainSettings, pretrain

    ads = [a.record for a in world.ads.values()]
    organic = world.organic_items() if cfg.organic_slots > 0 else []
    s = PretrainSettings(run_dir=run_dir, encoder=cfg.encoder, steps=cfg.pretrain_steps,
                         level_sizes="64,32,16", history_len=10, batch_size=128, seed=seed,
                         progress=False, checkpoint_every=0, held_out_frac=0.05,
                         resume=False, value_own_items=cfg.value_own_items,
                         value_priors=cfg.value_priors, **cfg.pretrain)
    res = pretrain(s, ads, log_feedback, organic)
    return res.model, res.tokenizer, res.metrics


def sid_tokenizer(world: World, cfg: EvalConfig, seed: int) -> Any:
    """The tokenizer :func:`pretrain_on` would fit on ``world``'s ads (its semantic codes
    only matter here): the SID-diversity key when no generative policy runs."""
    from learner.tokenizer import TokenizerConfig, UASIDTokenizer

    return UASIDTokenizer.fit([a.record for a in world.ads.values()], TokenizerConfig(
        level_sizes=(64, 32, 16), seed=seed, encoder=cfg.encoder))


class SidPrefixes:
    """Semantic-ID level-0 code of every ad of a world, from a copy of one tokenizer
    (an ad new to it gets its id as the live learner would place it; the level-0 code
    depends on the ad's content only, so every policy's world gets the same codes)."""

    def __init__(self, tok: Any) -> None:
        import copy

        self.tok = copy.deepcopy(tok)

    def __call__(self, world: World) -> dict[str, int]:
        from learner.tokenizer import TokenizerError

        new = [a.record for a in world.ads.values() if a.ad_id not in self.tok]
        try:
            if new:
                self.tok.add_ads(new)
        except TokenizerError:      # the id space is full somewhere: one at a time
            for ad in new:
                try:
                    self.tok.add_ads([ad])
                except TokenizerError:
                    continue
        return {a: int(self.tok.ids_of(a)[0]) for a in world.ads if a in self.tok}


def run_seed(cfg: EvalConfig, seed: int, work_dir: Path,
             progress: Callable[[str], None] | None = None) -> list[PolicyRun]:
    """Every policy of ``cfg`` on one seed (each on a world rebuilt from the seed)."""
    from learner.embeddings import clear_embedding_cache

    clear_embedding_cache()     # a seed's results never depend on the seeds run before it
    runs: list[PolicyRun] = []
    t0 = time.perf_counter()
    world = World(world_config(cfg, seed))
    logs = logging_phase(world, cfg, seed)
    after_logs = copy.deepcopy(world)   # every policy starts from this state
    cold_after = world.now
    bits = click_bits(logs)
    seen_before: dict[str, set[str]] = {}
    for fb in logs:
        seen_before.setdefault(fb.user_id, set()).update(it.ad_id for it in fb.items)
    pretrained = None
    if any(p in GENERATIVE for p in cfg.policies):
        pretrained = pretrain_on(logs, world, cfg, seed, work_dir / f"pretrain-{seed}")
    prefixes = SidPrefixes(pretrained[1] if pretrained is not None
                           else sid_tokenizer(world, cfg, seed))
    if progress:
        progress(f"seed {seed}: logging phase + pretraining {time.perf_counter() - t0:.0f}s")
    for name in cfg.policies:
        w = copy.deepcopy(after_logs)   # identical state for every policy
        policy = make_policy(name, w, seed, cfg, pretrained, logs,
                             work_dir / f"serve-{seed}-{name}")
        t1 = time.perf_counter()
        runs.append(run_policy(w, policy, cfg, seed, cold_after, progress, bits,
                               seen_before, prefixes))
        if pretrained is not None and name in GENERATIVE:
            runs[-1].offline = dict(pretrained[2])
        if progress:
            s = runs[-1].summary()
            progress(f"{name} seed {seed}: RPM(last quarter) {s['rpm_last_quarter']:.2f} "
                     f"in {time.perf_counter() - t1:.0f}s")
    return runs


def _seed_worker(cfg: EvalConfig, seed: int, work_dir: Path, threads: int,
                 messages: Any) -> list[PolicyRun]:
    import torch

    configure_logging()    # a fresh interpreter: log where the parent's stderr goes
    torch.set_num_threads(threads)
    return run_seed(dataclasses.replace(cfg, threads=threads), seed, work_dir, messages.put)


def compare(cfg: EvalConfig, work_dir: Path,
            progress: Callable[[str], None] | None = None, jobs: int = 1) -> dict[str, Any]:
    """Run every policy on every seed; return per-run summaries and aggregates.

    ``jobs`` > 1 runs that many seeds at once in worker processes (each with
    ``cfg.threads`` torch and ONNX Runtime threads, 1 when 0): the seeds share nothing,
    so on a few cores this beats one process with more threads per operation."""
    if jobs <= 1 or len(cfg.seeds) <= 1:
        runs = [r for seed in cfg.seeds for r in run_seed(cfg, seed, work_dir, progress)]
        return aggregate(runs, cfg)
    import multiprocessing as mp
    import queue
    import threading
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        messages = manager.Queue()
        done = threading.Event()

        def relay() -> None:
            while not done.is_set():
                try:
                    msg = messages.get(timeout=0.5)
                except queue.Empty:
                    continue
                if progress:
                    progress(msg)

        relay_thread = threading.Thread(target=relay, daemon=True)
        relay_thread.start()
        with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_seed_worker, cfg, seed, work_dir, cfg.threads or 1,
                                   messages) for seed in cfg.seeds]
            per_seed = [f.result() for f in futures]
        done.set()
        relay_thread.join()
    return aggregate([r for runs in per_seed for r in runs], cfg)


def t95(df: int) -> float:
    """Two-sided 95 % Student t quantile (``df`` ≥ 1): the table to 10 degrees of
    freedom, then the Cornish–Fisher expansion (within 0.001 of the exact value)."""
    if df < 1:
        raise ValueError(f"t95 needs df >= 1, got {df}")
    if df in _T95:
        return _T95[df]
    z = Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval (the mean alone for one value)."""
    m = statistics.mean(values)
    if len(values) < 2:
        return m, m, m
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


@dataclass(frozen=True)
class PairedRatio:
    """The ratio of two policies' mean metric over paired units (seeds: same world, same
    traffic, same response randomness), its 95 % interval and the smallest effect the
    design detects.

    ``ratio`` = mean(a) / mean(b). Its log has the delta-method standard error
    ``se_log`` = sd(d) / √n with ``d_i = a_i / mean(a) - b_i / mean(b)`` (the paired
    linearization: the covariance of a and b across units cancels); the interval is
    ``ratio · exp(±t95(n-1) · se_log)`` and ``mde`` = (z₀.₉₇₅ + z₀.₈) · ``se_log``: the
    relative effect (0.05: 5 %) a two-sided 5 % test detects with 80 % power."""

    ratio: float
    ci_low: float | None
    ci_high: float | None
    se_log: float | None
    mde: float | None
    n: int
    per_unit: tuple[float, ...]
    """a_i / b_i per unit (seed)."""


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> PairedRatio | None:
    """:class:`PairedRatio` of per-unit values ``a`` over ``b`` (same units, same order);
    None when empty or a mean is not positive. One unit gives the ratio alone."""
    if len(a) != len(b):
        raise ValueError(f"paired_ratio needs paired values, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return None
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    if ma <= 0 or mb <= 0:
        return None
    ratio = ma / mb
    per_unit = tuple(x / y if y else math.nan for x, y in zip(a, b, strict=True))
    if n < 2:
        return PairedRatio(ratio, None, None, None, None, n, per_unit)
    d = [x / ma - y / mb for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(d) / math.sqrt(n)
    half = t95(n - 1) * se
    return PairedRatio(ratio, ratio * math.exp(-half), ratio * math.exp(half), se,
                       (Z975 + Z80) * se, n, per_unit)


def units_for_mde(se_log: float, n: int, target: float = 0.05) -> int:
    """Units (seeds) of the same kind that bring the MDE of a ratio measured with
    standard error ``se_log`` on ``n`` units down to ``target`` (SE falls as 1/√n)."""
    sd = se_log * math.sqrt(n)
    return max(2, math.ceil(((Z975 + Z80) * sd / target) ** 2))


def ratio_entries(name: str, pr: PairedRatio | None) -> dict[str, Any]:
    """The result keys of one ratio: ``name``, ``name_ci_low``, ``name_ci_high``,
    ``name_ci95``, ``name_se_log``, ``mde_name`` and ``name_per_seed`` (None when the
    ratio is missing; the interval and MDE are None with one seed)."""
    if pr is None:
        return {name: None, f"{name}_ci_low": None, f"{name}_ci_high": None,
                f"{name}_ci95": None, f"{name}_se_log": None, f"mde_{name}": None,
                f"{name}_per_seed": None}
    return {name: pr.ratio, f"{name}_ci_low": pr.ci_low, f"{name}_ci_high": pr.ci_high,
            f"{name}_ci95": ([pr.ci_low, pr.ci_high] if pr.ci_low is not None
                             and pr.ci_high is not None else None),
            f"{name}_se_log": pr.se_log, f"mde_{name}": pr.mde,
            f"{name}_per_seed": list(pr.per_unit)}


def aggregate(runs: Sequence[PolicyRun], cfg: EvalConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": list(cfg.seeds), "requests_per_policy": cfg.requests,
                           "window": "last quarter of the run", "policies": {}}
    by_policy: dict[str, list[PolicyRun]] = {}
    for r in runs:
        by_policy.setdefault(r.policy, []).append(r)
    for name, rs in by_policy.items():
        sums = [r.summary() for r in rs]
        entry: dict[str, Any] = {}
        for key in sums[0]:
            m, lo, hi = mean_ci([s[key] for s in sums])
            entry[key] = {"mean": m, "ci95": [lo, hi]}
        entry["rpm_curve"] = [statistics.mean(r.rpm(slice(i, i + 1)) for r in rs)
                              for i in range(min(len(r.impressions) for r in rs))]
        entry["per_seed_rpm_last_quarter"] = [s["rpm_last_quarter"] for s in sums]
        entry["per_seed_rpm_whole_run"] = [s["rpm_all"] for s in sums]
        if all("organic_engagement_last_quarter" in s for s in sums):
            entry["per_seed_organic_engagement_last_quarter"] = [
                s["organic_engagement_last_quarter"] for s in sums]
        out["policies"][name] = entry
    pol = out["policies"]

    def ratio_at(a: str, b: str, key: str) -> float | None:
        if a in pol and b in pol and pol[b][key]["mean"]:
            return float(pol[a][key]["mean"] / pol[b][key]["mean"])
        return None

    def per_seed(name: str, whole: bool) -> dict[int, float]:
        return {r.seed: r.rpm() if whole else r.rpm(r.window()) for r in by_policy[name]}

    def seed_ratio_ci(a: str, b: str) -> list[float] | None:
        """95 % interval of the mean per-seed ratio a/b (the earlier interval; kept)."""
        ra, rb = per_seed(a, False), per_seed(b, False)
        ratios = [ra[k] / rb[k] for k in ra if rb.get(k)]
        if not ratios:
            return None
        _, lo, hi = mean_ci(ratios)
        return [lo, hi]

    best = best_baseline(by_policy)
    if best is not None and "best_baseline" not in by_policy:
        by_policy["best_baseline"] = by_policy[best]
    out["best_baseline_policy"] = ("best_baseline" if "best_baseline" in pol else best)
    out["best_baseline"] = best
    out["policies_run"] = list(pol)
    out["ratios"] = []
    for a, b in RATIO_PAIRS:
        name = f"{a}_over_{b}"
        if a not in by_policy or b not in by_policy:
            if (a, b) in _ALWAYS_REPORTED:
                out.update(ratio_entries(name, None))
                out.update(ratio_entries(f"{name}_whole_run", None))
            continue
        for whole in (False, True):
            ra, rb = per_seed(a, whole), per_seed(b, whole)
            seeds = [k for k in ra if k in rb]
            pr = paired_ratio([ra[k] for k in seeds], [rb[k] for k in seeds])
            out.update(ratio_entries(name + ("_whole_run" if whole else ""), pr))
        out["ratios"].append(name)
        if (a, b) in _ALWAYS_REPORTED:
            out[f"{name}_per_seed_ci95"] = seed_ratio_ci(a, b)
    out["frozen_over_observable_oracle_first_quarter"] = ratio_at(
        "frozen", "observable_oracle", "rpm_first_quarter")
    out["frozen_over_observable_oracle_last_quarter"] = ratio_at(
        "frozen", "observable_oracle", "rpm_last_quarter")
    return out


_ALWAYS_REPORTED = (("rspo", "frozen"), ("rspo", "best_baseline"), ("rspo", "frozen_explore"),
                    ("rspo", "dlrm"), ("rspo", "vsl_only"),
                    ("rspo", "observable_oracle"), ("rspo", "oracle"),
                    ("observable_oracle", "oracle"))
"""Ratios whose keys exist (None when a policy did not run), as before."""


def best_baseline(by_policy: Mapping[str, Sequence[PolicyRun]]) -> str | None:
    """The policy of :data:`BASELINES` with the highest mean last-quarter RPM over seeds
    (None when none ran)."""
    ran = [b for b in BASELINES if b in by_policy]
    if not ran:
        return None
    return max(ran, key=lambda b: statistics.fmean(r.rpm(r.window()) for r in by_policy[b]))


def _cell(e: dict[str, Any], key: str, spec: str) -> str:
    """``e[key]``'s mean formatted by ``spec``; "–" when missing or not finite."""
    v = e.get(key, {}).get("mean")
    return format(v, spec) if isinstance(v, float | int) and math.isfinite(v) else "–"


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, float | int) and math.isfinite(v) else "–"


def ratio_table(results: dict[str, Any]) -> str:
    """Every reported ratio: last quarter and whole run, each its mean (ratio of the
    means over seeds), paired 95 % interval and MDE at 80 % power."""
    rows = ["| ratio | last quarter (95% CI) | MDE | whole run (95% CI) | MDE (whole run) |",
            "|---|---|---|---|---|"]

    def cell(key: str) -> str:
        lo, hi = results.get(f"{key}_ci_low"), results.get(f"{key}_ci_high")
        ci = f" ({_fmt(lo, '.3f')}–{_fmt(hi, '.3f')})" if lo is not None else ""
        return _fmt(results.get(key), ".3f") + ci

    for name in results.get("ratios", []):
        whole = f"{name}_whole_run"
        mde, mde_whole = results.get(f"mde_{name}"), results.get(f"mde_{whole}")
        rows.append(f"| {name.replace('_over_', ' / ')} | {cell(name)} "
                    f"| {_fmt(mde, '.1%')} | {cell(whole)} | {_fmt(mde_whole, '.1%')} |")
    return "\n".join(rows)


def headline_table(results: dict[str, Any]) -> str:
    """The per-policy table, then (when any ratio was reported) :func:`ratio_table`."""
    rows = ["| policy | RPM last quarter (95% CI) | RPM first quarter | realized RPM | CTR "
            "| CVR | regret vs oracle | regret vs observable oracle "
            "| cold-start revenue share | catalogue coverage | slate diversity "
            "| SID diversity | novelty (unseen) | novelty (bits) | personalization "
            "| ms / request |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["policies"].items():
        r = e["rpm_last_quarter"]
        rows.append(
            f"| {name} | {r['mean']:.2f} ({r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}) "
            f"| {e['rpm_first_quarter']['mean']:.2f} "
            f"| {e['rpm_realized_last_quarter']['mean']:.2f} | {e['ctr']['mean']:.4f} "
            f"| {e['cvr']['mean']:.3f} | {e['regret']['mean']:.1f} "
            f"| {e['regret_vs_observable_oracle']['mean']:.1f} "
            f"| {e['cold_start_revenue_share']['mean']:.1%} "
            f"| {_cell(e, 'catalogue_coverage', '.1%')} | {_cell(e, 'slate_diversity', '.2f')} "
            f"| {_cell(e, 'sid_diversity', '.2f')} | {_cell(e, 'novelty_unseen', '.1%')} "
            f"| {_cell(e, 'novelty_bits', '.2f')} | {_cell(e, 'personalization', '.2f')} "
            f"| {e['latency_ms_per_request']['mean']:.2f} |")
    table = "\n".join(rows)
    if results.get("ratios"):
        table += "\n\n" + ratio_table(results)
    return table


def plot_rpm_curves(results: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, e in results["policies"].items():
        ax.plot(range(1, len(e["rpm_curve"]) + 1), e["rpm_curve"], label=name,
                linewidth=2.5 if name == "rspo" else 1.2,
                linestyle="--" if name.endswith("oracle") else "-")
    ax.set_xlabel("time bucket of the evaluation run")
    ax.set_ylabel("expected revenue per mille impressions")
    ax.set_title(title)
    ax.legend(ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ratios(results: dict[str, Any], path: Path, title: str) -> Path | None:
    """Every reported ratio with its paired 95 % interval, last quarter and whole run,
    and the MDE band around 1 (an interval inside it cannot tell an effect that small);
    None when no ratio has an interval."""
    rows = [n for n in results.get("ratios", []) if results.get(f"{n}_ci_low") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    for y, n in zip(ys, rows, strict=True):
        for key, dy, color, label in ((n, 0.12, "tab:blue", "last quarter"),
                                      (f"{n}_whole_run", -0.12, "tab:orange", "whole run")):
            r, lo, hi = (results.get(key), results.get(f"{key}_ci_low"),
                         results.get(f"{key}_ci_high"))
            if r is None or lo is None or hi is None:
                continue
            ax.errorbar(r, y + dy, xerr=[[r - lo], [hi - r]], fmt="o", color=color,
                        capsize=3, label=label if y == ys[0] else None)
        mde = results.get(f"mde_{n}")
        if mde is not None:
            ax.plot([1 - mde, 1 + mde], [y, y], color="grey", lw=6, alpha=0.25,
                    solid_capstyle="butt", label="±MDE (last quarter)" if y == ys[0] else None)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(ys, [n.replace("_over_", " / ") for n in rows])
    ax.set_xlabel("RPM ratio (ratio of means over seeds, paired 95% CI)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
