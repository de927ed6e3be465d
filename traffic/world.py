"""A seeded, simulated ad world: users, ads, a ground-truth response model, delays.

Everything here is pure and in-process (no Kafka, no HTTP), so an evaluation harness
can run policies over identical traffic. :mod:`traffic.driver` drives it against
the serving worker and Kafka.

* **Users** have a latent interest vector over the topic space (industries and
  product categories). It follows an Ornstein-Uhlenbeck process around a long-run
  mean that occasionally jumps to a new favourite category, plus an hour-of-day
  modulation per industry (gaming at night, finance in office hours, ...).
* **Ads** have a latent topic vector tied to their text's category, business
  attributes (industry, advertiser, bid type cpc/cpa/cpm, bid, budget) and a
  status. Budgets deplete with realized spend; ads pause and resume; new ads arrive.
* **Ground truth**: ``pCTR = sigmoid(a·<u,ad> + hour effect + position bias +
  placement/device bias + ad quality + b)``, ``pCVR = sigmoid(c·<u,ad> + bid-type
  bias + b)`` given a click. Expected value per impression is the serving formula:
  cpc ``bid·pCTR``, cpa ``bid·pCTR·pCVR``, cpm ``bid/1000``.
* **Delays**: a click follows its impression after an exponential delay (mean 5 s);
  a conversion follows its click after a mixture: 35 % exponential (mean 3 min),
  65 % log-normal (median window/4, sigma 1.0), so about 5 % of conversions land
  after the attribution window (the joiner's "late" path).
* **Organic content**: a finite catalogue of videos and articles,
  ``organic_per_topic`` per category (ids ``<topic>#<n>``, texts tied to the
  category). Users consume them between requests (their observable history) and, in a
  mixed feed (``organic_slots`` > 0), view, like and dwell on the ones served:
  ``P(view) = decay^rank · sigmoid(b + s·<u, topic> + quality)``.

Randomness comes from numpy Generators seeded from one seed, with separate streams
for the world's construction (effects, users, the initial catalogue) and each new ad's
attributes, the arrival times of new ads, each ad's own lifecycle (its pause and
bid-revision candidate times and their variates, state-independent), arrivals (request
times, users, contexts, interest drift), and the organic items' hidden quality. The
response variates are counter-based: every uniform behind a click, a conversion, their
delays and values (and an organic item's view, like, delay and dwell) is a hash of
(seed, stream, request number, ad or item number, variate number), so the outcome of
showing a given ad to a given request does not depend on the order of serving, on
what else is in the slate, or on which policy chose it.

**Common random numbers.** Two worlds built from one seed and fed the same request
stream stay coupled whatever they serve: the requests (users, contexts, times, interest
drift, organic consumption), the catalogue (new ads, their attributes and arrival times),
each ad's pause, resume and bid-revision times, and the response to any (request, ad)
pair are the same. What legitimately differs is what the served slates cause: spend and
budget exhaustion, creative fatigue, the users' clicked-ad history and, in a mixed feed,
the organic history. A policy comparison on one seed is therefore paired: a difference
in revenue is a difference in what was shown, not in luck.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streams.features import organic_topic
from streams.schemas import (
    Ad,
    BidType,
    Click,
    Conversion,
    OrganicEngagement,
    OrganicItem,
    OrganicKind,
)

DEFAULT_START_TIME = 1_704_067_200.0
"""2024-01-01T00:00:00Z: the default simulated start, so runs are reproducible."""

# -- the catalog vocabulary -----------------------------------------------------------


@dataclass(frozen=True)
class IndustrySpec:
    """Words and numbers of one industry: categories with products, offers, goals."""

    name: str
    categories: dict[str, tuple[str, ...]]
    """category -> product names (the category word is in every text)."""
    offers: tuple[str, ...]
    goal: str
    brand_words: tuple[str, ...]
    value_median: float
    """Median conversion value (currency)."""
    peak_hour: int
    """Hour of day (UTC) at which interest in the industry peaks."""


INDUSTRIES: tuple[IndustrySpec, ...] = (
    IndustrySpec(
        "retail",
        {"running shoes": ("Trail running shoes", "Road racing shoes",
                           "Cushioned walking sneakers"),
         "headphones": ("Noise-cancelling headphones", "Wireless earbuds", "Studio headphones"),
         "winter jackets": ("Down parka", "Waterproof shell jacket", "Fleece-lined coat"),
         "home decor": ("Linen throw pillows", "Ceramic table lamp", "Wool area rug")},
        ("20% off this week", "free shipping on all orders", "buy one, get one half price",
         "new season arrivals", "members save 15%"),
        "purchase", ("Acme", "Northpeak", "Urbanline", "Cobalt", "Maple & Co"), 60.0, 13),
    IndustrySpec(
        "travel",
        {"beach holidays": ("All-inclusive beach resort", "Island hopping cruise",
                            "Seaside villa stay"),
         "city breaks": ("Weekend in Lisbon", "Paris city break", "Tokyo food tour"),
         "flights": ("Nonstop flights to New York", "Cheap flights to Barcelona",
                     "Business class to Singapore"),
         "hotels": ("Boutique hotel downtown", "Airport hotel with shuttle",
                    "Mountain lodge retreat")},
        ("book now, pay later", "save up to 30%", "free cancellation", "kids stay free",
         "last-minute deals"),
        "booking", ("Skyward", "Wanderly", "BlueHarbor", "Atlas Trips", "SunTrail"), 400.0, 20),
    IndustrySpec(
        "finance",
        {"credit cards": ("Cashback credit card", "Travel rewards card", "No-fee student card"),
         "savings accounts": ("High-yield savings account", "Fixed-rate savings bond",
                              "Kids savings account"),
         "investing": ("Commission-free investing app", "Robo-advisor portfolio",
                       "Retirement fund plan"),
         "insurance": ("Home insurance quote", "Pet insurance plan", "Term life insurance")},
        ("0% APR for 12 months", "open an account in 5 minutes", "$100 sign-up bonus",
         "no monthly fees", "get a free quote"),
        "signup", ("Ledgerly", "Crestbank", "Finwise", "Summit Capital", "Harbor Mutual"),
        120.0, 11),
    IndustrySpec(
        "gaming",
        {"strategy games": ("Empire strategy game", "Space colony builder",
                            "Medieval tactics saga"),
         "racing games": ("Street racing game", "Rally championship", "Kart racing party"),
         "puzzle games": ("Daily word puzzle", "Match-three adventure", "Logic grid puzzles"),
         "consoles": ("Handheld game console", "Next-gen console bundle", "Retro mini console")},
        ("free to play", "download today", "season pass 50% off", "exclusive launch skin",
         "play with friends"),
        "install", ("Pixelforge", "Nebula Games", "Riftworks", "Bytewave", "Kraken Studio"),
        10.0, 22),
    IndustrySpec(
        "food",
        {"meal kits": ("Weekly meal kit box", "Family dinner kit", "High-protein meal plan"),
         "pizza delivery": ("Stone-baked pizza delivery", "Two large pizzas deal",
                            "Gluten-free pizza"),
         "coffee": ("Single-origin coffee subscription", "Espresso bean bundle",
                    "Cold brew pack"),
         "snacks": ("Vegan snack box", "Organic trail mix", "Dark chocolate bites")},
        ("first box free", "free delivery tonight", "2 for 1 on weekends", "save 25% today",
         "order in one tap"),
        "order", ("Tastebox", "Urban Oven", "Beanhouse", "Greenbite", "Daily Crave"), 35.0, 19),
    IndustrySpec(
        "auto",
        {"electric cars": ("Electric SUV test drive", "Compact electric hatchback",
                           "Electric pickup truck"),
         "car leasing": ("Flexible car lease", "Business car leasing", "Used car financing"),
         "tyres": ("All-season tyres", "Winter tyres fitted", "Performance tyres"),
         "car care": ("Full-service car wash", "Ceramic paint coating", "Oil change package")},
        ("book a test drive", "0% financing", "trade-in bonus", "free fitting", "limited stock"),
        "lead", ("Voltara", "Roadmaster", "Axle & Sons", "Drivewise", "Torque Motors"),
        800.0, 10),
    IndustrySpec(
        "education",
        {"coding": ("Python coding bootcamp", "Web development course", "Data science program"),
         "languages": ("Spanish language course", "Japanese for beginners",
                       "Business English classes"),
         "degrees": ("Online MBA program", "Part-time master's degree", "Nursing degree"),
         "test prep": ("SAT test prep", "GMAT prep course", "IELTS practice tests")},
        ("enroll today", "first lesson free", "scholarships available", "learn at your own pace",
         "certificate included"),
        "enrollment", ("Learnify", "Brightpath", "Scholarly", "CodeCamp", "Lingua Hub"),
        300.0, 15),
    IndustrySpec(
        "health",
        {"fitness trackers": ("Smart fitness tracker", "GPS running watch",
                              "Sleep tracking ring"),
         "vitamins": ("Daily multivitamin", "Vitamin D drops", "Omega-3 capsules"),
         "telehealth": ("Online doctor visit", "Therapy sessions online", "Dermatology consult"),
         "yoga": ("Beginner yoga classes", "Hot yoga membership", "Pilates at home")},
        ("try free for 30 days", "15% off your first order", "same-day appointments",
         "cancel anytime", "covered by most insurance"),
        "subscription", ("Vitalis", "Pulsewell", "Calmly", "Healthbridge", "Zenfit"), 50.0, 7),
)

INDUSTRY_NAMES: tuple[str, ...] = tuple(s.name for s in INDUSTRIES)
CATEGORIES: tuple[tuple[str, str], ...] = tuple(
    (s.name, c) for s in INDUSTRIES for c in s.categories
)
"""(industry, category) pairs; topic dims are industries first, then categories."""
N_TOPICS = len(INDUSTRIES) + len(CATEGORIES)

DEVICES = ("mobile", "desktop", "tablet")
PLACEMENTS = ("feed", "search", "sidebar", "video")
PLACEMENT_WEIGHTS = (0.5, 0.25, 0.15, 0.10)
PLACEMENT_BIAS = {"feed": 0.0, "search": 0.35, "sidebar": -0.6, "video": -0.25}
DEVICE_BIAS = {"mobile": 0.1, "desktop": 0.0, "tablet": -0.1}
BID_RANGES = {"cpc": (0.2, 3.0), "cpa": (5.0, 60.0), "cpm": (1.0, 10.0)}
REGIONS = ("na", "eu", "apac", "latam")
REGION_WEIGHTS = (0.35, 0.3, 0.25, 0.10)
AGE_BANDS = ("18-24", "25-34", "35-49", "50+")
AGE_WEIGHTS = (0.2, 0.35, 0.3, 0.15)
AGE_INDUSTRY_TILT: dict[str, dict[str, float]] = {
    "18-24": {"gaming": 3.0, "education": 2.0, "food": 1.5},
    "25-34": {"travel": 2.0, "retail": 1.5, "food": 1.5, "finance": 1.2},
    "35-49": {"finance": 2.0, "auto": 2.0, "health": 1.5, "retail": 1.2},
    "50+": {"health": 3.0, "finance": 2.0, "travel": 1.5},
}
"""Relative weight of an industry among the favourite categories by age band (1 if absent)."""


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class DelayModel:
    """Conversion delay after the click: a share of fast conversions, a heavy tail.

    ``fast_share`` of conversions arrive after ``Exp(fast_mean_s)``; the rest after a
    log-normal with median ``window_s * slow_median_frac`` and ``slow_sigma``. With the
    defaults and a 3600 s window, ~37 % arrive within 5 minutes, the median is ~10 minutes
    and ~5 % arrive after the window.
    """

    window_s: float = 3600.0
    fast_share: float = 0.35
    fast_mean_s: float = 180.0
    slow_median_frac: float = 0.25
    slow_sigma: float = 1.0
    click_mean_s: float = 5.0
    """Mean of the exponential delay from impression to click."""

    def sample_conversion(self, rng: np.random.Generator) -> float:
        if rng.random() < self.fast_share:
            return float(rng.exponential(self.fast_mean_s))
        median = self.window_s * self.slow_median_frac
        return float(math.exp(math.log(median) + self.slow_sigma * rng.standard_normal()))

    def sample_click(self, rng: np.random.Generator) -> float:
        return float(rng.exponential(self.click_mean_s))

    def conversion_from(self, u_mix: float, u_fast: float, z: float) -> float:
        """:meth:`sample_conversion` from given variates: uniforms ``u_mix``, ``u_fast``
        in (0, 1) and a standard normal ``z`` (counter-based responses)."""
        if u_mix < self.fast_share:
            return -self.fast_mean_s * math.log(u_fast)
        median = self.window_s * self.slow_median_frac
        return math.exp(math.log(median) + self.slow_sigma * z)

    def click_from(self, u: float) -> float:
        """:meth:`sample_click` from a uniform ``u`` in (0, 1)."""
        return -self.click_mean_s * math.log(u)

    def late_share(self) -> float:
        """Probability that a conversion lands after the attribution window."""
        fast_late = math.exp(-self.window_s / self.fast_mean_s)
        z = math.log(1.0 / self.slow_median_frac) / self.slow_sigma
        slow_late = 0.5 * math.erfc(z / math.sqrt(2.0))
        return self.fast_share * fast_late + (1.0 - self.fast_share) * slow_late


@dataclass(frozen=True)
class WorldConfig:
    """Every parameter of the simulated world (documented in docs/traffic.md)."""

    seed: int = 0
    n_users: int = 2000
    n_ads: int = 200
    start_time: float = DEFAULT_START_TIME
    request_rate: float = 20.0 / 60.0
    """Requests per *simulated* second (the driver sets wall rate / speed)."""
    slate_size: int = 5
    run_id: str = ""
    """Prefix of request ids; default ``sim<seed>``. Change it to run the same seed twice
    against the same topics without the joiner deduplicating the second run."""
    # lifecycle (rates per simulated hour)
    new_ads_per_hour: float = 6.0
    pause_per_hour: float = 0.02
    """Hazard of an active ad pausing."""
    resume_per_hour: float = 0.5
    """Hazard of a paused ad resuming."""
    budget_scale: float = 1.0
    """Budgets are uniform in [50, 1000] × this (currency)."""
    new_advertiser_share: float = 0.3
    # ground truth
    ctr_affinity: float = 2.5
    ctr_bias: float = -3.3
    position_bias: float = -0.3
    """Added to the click logit per position (0 = top)."""
    cvr_affinity: float = 2.0
    cvr_bias: dict[str, float] = field(
        default_factory=lambda: {"cpc": -3.0, "cpa": -2.0, "cpm": -3.5})
    hour_amplitude: float = 0.5
    """Amplitude of the per-industry hour-of-day interest (the ``hour`` context key)."""
    ad_quality_sigma: float = 0.6
    """Hidden per-ad click-logit offset: N(0, sigma²) (new ads included)."""
    context_effect_sigma: float = 0.3
    """Sigma of the region × industry and placement × industry click-logit effects
    (drawn once per world), so region and placement tell ads apart."""
    # drift
    fatigue_user: float = 0.3
    """Creative fatigue per user: ``-fatigue_user · log(1 + n)`` on the click logit
    after the user has seen the ad ``n`` times."""
    fatigue_overall: float = 0.6
    """Overall wear-out: ``-fatigue_overall · (1 - exp(-imps / fatigue_overall_scale))``
    on the click logit after the ad's ``imps`` impressions (all users)."""
    fatigue_overall_scale: float = 400.0
    bid_change_per_hour: float = 0.05
    """Hazard per active or exhausted ad of a bid/budget revision by its advertiser."""
    bid_change_sigma: float = 0.35
    """Log-normal sigma of a revised bid (clipped to its bid type's range); the budget
    gets a top-up of uniform [0, 0.5] × budget, which reactivates an exhausted ad."""
    trend_amplitude: float = 0.5
    """Category trends: click-logit offset ``a · sin(2π t / period + phase)`` per
    category, with period uniform in ``trend_period_days`` (hidden, rises and falls)."""
    trend_period_days: tuple[float, float] = (0.5, 3.0)
    # user interests
    interest_theta_per_hour: float = 1.0 / 3.0
    """OU mean reversion rate."""
    interest_sigma: float = 0.1
    """OU stationary standard deviation per topic dimension."""
    interest_shift_per_day: float = 1.0
    """Rate at which a user's long-run interest jumps to a new favourite category."""
    activity_sigma: float = 1.0
    """Log-normal sigma of per-user request frequency (some users are much busier)."""
    recent_ads: int = 5
    # observable interest
    organic_per_request: float = 3.0
    """Mean number of organic items (videos, articles) a user consumes between two of
    their ad requests (Poisson); each item's topic is drawn from the hidden interest."""
    organic_sharpness: float = 6.0
    """Organic topic choice: softmax(sharpness · <interest, topic vector>) over categories."""
    organic_noise: float = 0.15
    """Share of organic items on a uniformly random topic (what is trending, shared)."""
    recent_organic: int = 20
    """How many recent organic item ids a request carries."""
    organic_per_topic: int = 8
    """Organic catalogue: items per category topic (ids ``<topic>#0`` … ``#n-1``)."""
    # mixed feed (organic items served next to the ads)
    organic_slots: int = 0
    """Organic items each request asks for (``Request.organic_k``; 0 = ads-only)."""
    organic_quality_sigma: float = 0.5
    """Hidden per-item view-logit offset: N(0, sigma²), drawn once per world on a
    stream of its own."""
    organic_view_bias: float = -1.5
    organic_view_affinity: float = 4.0
    """``P(view) = organic_position_decay^rank · sigmoid(organic_view_bias +
    organic_view_affinity · affinity + quality)``, affinity = <interest, topic vector>."""
    organic_position_decay: float = 0.85
    """Position bias of a mixed feed: multiplies P(view) once per organic rank."""
    organic_like_bias: float = -3.0
    organic_like_affinity: float = 3.0
    """``P(like | view) = sigmoid(organic_like_bias + organic_like_affinity · affinity
    + quality)``."""
    organic_dwell_median_s: float = 15.0
    organic_dwell_affinity: float = 1.5
    organic_dwell_sigma: float = 0.8
    """Dwell seconds of a view: log-normal with median ``organic_dwell_median_s ·
    exp(organic_dwell_affinity · affinity)`` and sigma ``organic_dwell_sigma``."""
    organic_view_delay_s: float = 3.0
    """Mean of the exponential delay from the impression to a view."""
    declared_accuracy: float = 0.7
    """Probability that a user's declared interest (context key ``interest``) is the
    industry of their main favourite category (else a random industry)."""
    delays: DelayModel = field(default_factory=DelayModel)

    def __post_init__(self) -> None:
        if self.organic_per_topic < 1:
            raise ValueError(f"organic_per_topic must be >= 1, got {self.organic_per_topic}")
        if self.organic_slots < 0:
            raise ValueError(f"organic_slots must be >= 0, got {self.organic_slots}")
        if not 0.0 < self.organic_position_decay <= 1.0:
            raise ValueError("organic_position_decay must be in (0, 1], got "
                             f"{self.organic_position_decay}")
        if self.organic_dwell_median_s <= 0 or self.organic_dwell_sigma < 0:
            raise ValueError("organic_dwell_median_s must be > 0 and organic_dwell_sigma "
                             ">= 0")
        if self.organic_view_delay_s < 0:
            raise ValueError("organic_view_delay_s must be >= 0")

    @property
    def prefix(self) -> str:
        return self.run_id or f"sim{self.seed}"


# -- records ---------------------------------------------------------------------------


@dataclass
class SimUser:
    user_id: str
    device: str
    region: str
    activity: float
    mean: np.ndarray
    state: np.ndarray
    last_t: float
    recent: deque[str] = field(default_factory=deque)
    age_band: str = "25-34"
    declared: str = ""
    """Declared interest (an industry), shown in the context; stable."""
    organic: deque[str] = field(default_factory=deque)
    """Recent organic item ids, oldest first (observable interest)."""
    exposure: dict[str, int] = field(default_factory=dict)
    """Impressions of each ad to this user (creative fatigue)."""


@dataclass
class SimAd:
    """An ad in the world: its record (``Ad``) plus the hidden ground truth."""

    record: Ad
    vector: np.ndarray
    quality: float
    category: str
    spend: float = 0.0
    impressions: int = 0
    """Impressions so far, all users (overall wear-out)."""
    number: int = 0
    """Creation order (1 first): the key of the ad's lifecycle and response variates."""

    @property
    def ad_id(self) -> str:
        return self.record.ad_id

    @property
    def active(self) -> bool:
        return self.record.status == "active"


@dataclass(frozen=True)
class Request:
    """One recommend request, as the traffic driver sends it (event time included)."""

    seq: int
    request_id: str
    user_id: str
    context: dict[str, str]
    recent_ad_ids: list[str]
    k: int
    event_time: float
    recent_organic: list[str] = field(default_factory=list)
    """Ids of the user's recent organic items, oldest first (see :func:`organic_topic`)."""
    organic_k: int = 0
    """Organic items asked for next to the ads (a mixed feed); 0 = ads-only."""

    def body(self) -> dict[str, Any]:
        """The JSON body of ``POST /v1/recommend`` (``organic_k`` only when > 0)."""
        body: dict[str, Any] = {
            "user_id": self.user_id, "context": dict(self.context),
            "recent_ad_ids": list(self.recent_ad_ids), "k": self.k,
            "request_id": self.request_id, "event_time": self.event_time,
            "recent_organic": list(self.recent_organic)}
        if self.organic_k > 0:
            body["organic_k"] = self.organic_k
        return body


@dataclass(frozen=True)
class ItemOutcome:
    """What the user did with one slate item, and the truth behind it."""

    ad_id: str
    position: int
    pctr: float
    pcvr: float
    expected_value: float
    clicked: bool = False
    converted: bool = False
    click_time: float | None = None
    conversion_time: float | None = None
    conversion_value: float = 0.0
    reward: float = 0.0
    """Realized reward (revenue): cpc bid per click, cpa bid per in-window conversion,
    cpm bid/1000 per impression."""


@dataclass
class Response:
    """The sampled user response to one served slate."""

    request_id: str
    event_time: float
    items: list[ItemOutcome]
    clicks: list[Click]
    conversions: list[Conversion]
    ad_updates: list[Ad]
    """Ads whose status changed (budget exhausted) because of this response's spend."""
    unknown_ad_ids: list[str]
    """Served ads the world does not know or that are not active (no response sampled)."""

    @property
    def reward(self) -> float:
        return sum(i.reward for i in self.items)

    @property
    def expected_value(self) -> float:
        """True expected reward of the slate as shown (positions included)."""
        return sum(i.expected_value for i in self.items)

    @property
    def impressions(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class OrganicOutcome:
    """What the user did with one organic item of a mixed feed, and the truth behind it."""

    item_id: str
    position: int
    """Rank among the feed's organic items (0 first)."""
    affinity: float
    """<user interest, topic vector> when the feed was shown."""
    p_view: float
    p_like: float
    """P(like | view)."""
    expected_engagement: float
    """``p_view · (1 + p_like)`` (:meth:`World.organic_expected_engagement`)."""
    viewed: bool = False
    liked: bool = False
    dwell_s: float = 0.0
    view_time: float | None = None


@dataclass
class OrganicResponse:
    """The sampled engagement with the organic items of one mixed feed."""

    request_id: str
    event_time: float
    items: list[OrganicOutcome]
    events: list[OrganicEngagement]
    """``view``, ``like`` and ``dwell`` events, in event-time order."""
    unknown_item_ids: list[str]
    """Served ids outside the catalogue, or repeated (no response sampled)."""

    @property
    def impressions(self) -> int:
        return len(self.items)

    @property
    def views(self) -> int:
        return sum(1 for i in self.items if i.viewed)

    @property
    def likes(self) -> int:
        return sum(1 for i in self.items if i.liked)

    @property
    def dwell_s(self) -> float:
        return sum(i.dwell_s for i in self.items)

    @property
    def expected_engagement(self) -> float:
        """True expected engagement of the organic items as shown (ranks included)."""
        return sum(i.expected_engagement for i in self.items)


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (a bijection of uint64 with full avalanche)."""
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return np.asarray(x ^ (x >> np.uint64(31)))


def keyed_uniforms(seed: int, stream: int, seq: int, keys: Sequence[int],
                   n: int) -> np.ndarray:
    """Counter-based uniforms in (0, 1): ``[len(keys), n]``, entry ``[i, j]`` a hash of
    (seed, stream, seq, keys[i], j). The same arguments give the same numbers whatever
    else is drawn, so a response keyed by (request, ad) is common to every policy."""
    with np.errstate(over="ignore"):
        h = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        h = _mix64(h ^ np.uint64(stream))
        h = _mix64(h ^ np.uint64(seq))
        k = _mix64(h ^ np.asarray(keys, dtype=np.uint64).reshape(-1, 1))
        x = _mix64(k ^ np.arange(n, dtype=np.uint64).reshape(1, -1))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def _normal(u1: Any, u2: Any) -> Any:
    """A standard normal from two uniforms in (0, 1) (Box–Muller)."""
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _sigmoid(x: np.ndarray | float) -> Any:
    return 1.0 / (1.0 + np.exp(-x))


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _slug(text: str) -> str:
    return text.lower().replace(" ", "-")


ORGANIC_TOPICS: tuple[str, ...] = tuple(f"{ind}/{_slug(cat)}" for ind, cat in CATEGORIES)
"""Topic token of each category (``industry/category-slug``), the organic item topics."""
_TOPIC_INDEX = {t: i for i, t in enumerate(ORGANIC_TOPICS)}

ORGANIC_FORMATS: tuple[tuple[str, OrganicKind], ...] = (
    ("review", "video"), ("how-to guide", "article"), ("unboxing", "video"),
    ("vlog", "video"), ("top 10", "article"), ("news", "article"),
)
"""Formats of organic items and the kind each one is."""


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def parse_organic_id(item_id: str) -> tuple[int, int]:
    """(category index, item number) of an organic id ``<topic>#<n>``; raises
    ``ValueError`` for another shape or an unknown topic."""
    topic, sep, num = item_id.rpartition("#")
    if not sep or topic not in _TOPIC_INDEX or not num.isdigit() or not num.isascii():
        raise ValueError(f"not an organic item id (<topic>#<n>): {item_id!r}")
    return _TOPIC_INDEX[topic], int(num)


def organic_content(item_id: str) -> tuple[OrganicKind, str, str]:
    """(kind, title, description) of the organic item ``<topic>#<n>``: a format and one
    of the topic category's products, e.g. *Unboxing: Wireless earbuds (headphones,
    retail)*. Within a topic the first ``products × formats`` (18) items have distinct
    (format, product) pairs; later ones add a part number. Raises ``ValueError`` for an
    id that is not an organic id."""
    c, n = parse_organic_id(item_id)
    industry, category = CATEGORIES[c]
    spec = next(s for s in INDUSTRIES if s.name == industry)
    products = spec.categories[category]
    combos = len(products) * len(ORGANIC_FORMATS)
    i = n % combos
    product = products[i % len(products)]
    fmt, kind = ORGANIC_FORMATS[(i // len(products) + c) % len(ORGANIC_FORMATS)]
    title = f"{fmt[0].upper()}{fmt[1:]}: {product} ({category}, {industry})"
    if n >= combos:
        title += f", part {n // combos + 1}"
    article = "an" if fmt[0] in "aeiou" else "a"
    description = (f"{kind.title()} · {industry.title()} · {category}: {article} {fmt} "
                   f"about {product.lower()}.")
    return kind, title, description


def organic_text(item_id: str) -> str:
    """The text an organic item is embedded from: ``"<title>. <description>"`` (as an
    ad's)."""
    _, title, description = organic_content(item_id)
    return f"{title}. {description}"


# -- the world -------------------------------------------------------------------------


class World:
    """The simulated ad world. Deterministic given its :class:`WorldConfig`."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = cfg = config or WorldConfig()
        ss = np.random.SeedSequence(cfg.seed)
        world_ss, arrivals_ss, _resp_ss = ss.spawn(3)
        self.rng_world = np.random.default_rng(world_ss)
        self.rng_arrivals = np.random.default_rng(arrivals_ss)
        self.now = cfg.start_time
        """Simulated time up to which the lifecycle has been advanced."""
        self._next_arrival = cfg.start_time
        self._seq = 0
        self._ad_counter = 0
        self._advertisers: dict[str, list[str]] = {s.name: [] for s in INDUSTRIES}
        self._adv_counter = 0
        self.ads: dict[str, SimAd] = {}
        self.users: list[SimUser] = []
        self._matrix_cache: tuple[list[SimAd], np.ndarray] | None = None
        self._static_cache: tuple[list[SimAd], tuple[np.ndarray, ...]] | None = None
        self._industry_index = {s.name: i for i, s in enumerate(INDUSTRIES)}
        self._category_index = {c: len(INDUSTRIES) + i for i, c in enumerate(CATEGORIES)}
        self._cat_of = {c: i for i, c in enumerate(CATEGORIES)}
        rng = self.rng_world
        n_ind = len(INDUSTRIES)
        self._region_effect = rng.normal(0.0, cfg.context_effect_sigma, (len(REGIONS), n_ind))
        self._placement_effect = rng.normal(0.0, cfg.context_effect_sigma,
                                            (len(PLACEMENTS), n_ind))
        lo, hi = cfg.trend_period_days
        self._trend_period_s = rng.uniform(lo, hi, len(CATEGORIES)) * 86400.0
        self._trend_phase = rng.uniform(0.0, 2.0 * math.pi, len(CATEGORIES))
        cat_vectors = np.zeros((len(CATEGORIES), N_TOPICS))
        for i, (ind, cat) in enumerate(CATEGORIES):
            cat_vectors[i, self._industry_index[ind]] = 1.0
            cat_vectors[i, self._category_index[(ind, cat)]] = 1.5
        self._cat_vectors = cat_vectors / np.linalg.norm(cat_vectors, axis=1, keepdims=True)
        self._organic_seq = 0
        self._organic: dict[str, OrganicItem] = {}
        self._organic_cat: dict[str, int] = {}
        for c, topic in enumerate(ORGANIC_TOPICS):
            for n in range(cfg.organic_per_topic):
                item_id = f"{topic}#{n}"
                kind, title, description = organic_content(item_id)
                self._organic[item_id] = OrganicItem(
                    item_id=item_id, kind=kind, topic=topic, title=title,
                    description=description, created_time=cfg.start_time,
                    event_time=cfg.start_time)
                self._organic_cat[item_id] = c
        self._organic_index = {item_id: n for n, item_id in enumerate(self._organic)}
        quality_rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(4,)))
        self._organic_quality = dict(zip(
            self._organic, quality_rng.normal(0.0, cfg.organic_quality_sigma,
                                              len(self._organic)).tolist(), strict=True))
        self._build_users()
        self._group_prior = self._observable_priors()
        self._initial: list[Ad] = []
        self._lifecycle: list[tuple[float, int, int]] = []
        """Pending lifecycle events: (time, ad number, kind) with kind 0 a pause
        candidate, 1 a bid-revision candidate, 2 a resume (a heap)."""
        self._ad_rngs: dict[int, np.random.Generator] = {}
        self._by_number: dict[int, SimAd] = {}
        for _ in range(cfg.n_ads):
            created = cfg.start_time - float(self.rng_world.uniform(0.0, 7 * 86400.0))
            self._initial.append(self._new_ad(created, cfg.start_time).record)
        self._rng_new_ads = np.random.default_rng(np.random.SeedSequence(cfg.seed,
                                                                         spawn_key=(5,)))
        self._next_new_ad = self._gap(self._rng_new_ads, cfg.new_ads_per_hour, cfg.start_time)
        weights = np.array([u.activity for u in self.users])
        self._user_p = weights / weights.sum()

    # -- construction ------------------------------------------------------------------
    def _build_users(self) -> None:
        cfg, rng = self.config, self.rng_world
        for i in range(cfg.n_users):
            age = str(rng.choice(AGE_BANDS, p=AGE_WEIGHTS))
            mean = self._draw_interest_mean(rng, age)
            state = mean + rng.normal(0.0, cfg.interest_sigma, N_TOPICS)
            main = int(np.argmax(mean[: len(INDUSTRIES)]))
            declared = (INDUSTRY_NAMES[main] if rng.random() < cfg.declared_accuracy
                        else INDUSTRY_NAMES[int(rng.integers(len(INDUSTRIES)))])
            self.users.append(SimUser(
                user_id=f"u-{i:06d}",
                device=str(rng.choice(DEVICES, p=(0.6, 0.3, 0.1))),
                region=str(rng.choice(REGIONS, p=REGION_WEIGHTS)),
                activity=float(rng.lognormal(0.0, cfg.activity_sigma)),
                mean=mean, state=state, last_t=cfg.start_time,
                recent=deque(maxlen=cfg.recent_ads), age_band=age, declared=declared,
                organic=deque(maxlen=cfg.recent_organic)))

    def _draw_interest_mean(self, rng: np.random.Generator,
                            age_band: str = "") -> np.ndarray:
        """A few favourite categories (and their industries), unit length.

        Categories are drawn with weights tilted by the user's age band
        (``AGE_INDUSTRY_TILT``), so age band is an observable prior on interest.
        """
        tilt = AGE_INDUSTRY_TILT.get(age_band, {})
        w_cat = np.array([tilt.get(ind, 1.0) for ind, _ in CATEGORIES])
        w_cat = w_cat / w_cat.sum()
        v = np.zeros(N_TOPICS)
        n_fav = int(rng.integers(1, 4))
        for _ in range(n_fav):
            ind, cat = CATEGORIES[int(rng.choice(len(CATEGORIES), p=w_cat))]
            w = float(rng.uniform(0.5, 1.0))
            v[self._category_index[(ind, cat)]] += w
            v[self._industry_index[ind]] += 0.6 * w
        v += np.abs(rng.normal(0.0, 0.05, N_TOPICS))
        return _unit(v)

    def _observable_priors(self) -> dict[tuple[str, str], np.ndarray]:
        """Mean initial interest of the users sharing (age band, declared interest)."""
        groups: dict[tuple[str, str], list[np.ndarray]] = {}
        for u in self.users:
            groups.setdefault((u.age_band, u.declared), []).append(u.state)
        out = {k: np.mean(v, axis=0) for k, v in groups.items()}
        out[("", "")] = (np.mean([u.state for u in self.users], axis=0) if self.users
                         else np.zeros(N_TOPICS))
        return out

    def _new_advertiser(self, industry: IndustrySpec, rng: np.random.Generator) -> str:
        self._adv_counter += 1
        brand = industry.brand_words[int(rng.integers(len(industry.brand_words)))]
        adv = f"adv-{self._adv_counter:04d}-{brand.lower().replace(' & ', '-').replace(' ', '-')}"
        self._advertisers[industry.name].append(adv)
        return adv

    def _new_ad(self, created_time: float, event_time: float) -> SimAd:
        cfg, rng = self.config, self.rng_world
        spec = INDUSTRIES[int(rng.integers(len(INDUSTRIES)))]
        owners = self._advertisers[spec.name]
        if not owners or rng.random() < cfg.new_advertiser_share:
            advertiser = self._new_advertiser(spec, rng)
        else:
            advertiser = owners[int(rng.integers(len(owners)))]
        brand = advertiser.split("-", 2)[2].replace("-", " ").title()
        category = list(spec.categories)[int(rng.integers(len(spec.categories)))]
        products = spec.categories[category]
        product = products[int(rng.integers(len(products)))]
        offer = spec.offers[int(rng.integers(len(spec.offers)))]
        bid_types: tuple[BidType, ...] = ("cpc", "cpa", "cpm")
        bid_type = bid_types[int(rng.choice(3, p=(0.5, 0.3, 0.2)))]
        if bid_type == "cpc":
            bid = float(np.clip(rng.lognormal(math.log(0.8), 0.6), 0.2, 3.0))
        elif bid_type == "cpa":
            bid = float(np.clip(rng.lognormal(math.log(20.0), 0.6), 5.0, 60.0))
        else:
            bid = float(np.clip(rng.lognormal(math.log(4.0), 0.5), 1.0, 10.0))
        budget = float(rng.uniform(50.0, 1000.0)) * cfg.budget_scale
        self._ad_counter += 1
        ad_id = f"ad-{self._ad_counter:06d}"
        title = f"{product} from {brand} — {offer}"
        description = (f"{spec.name.title()} · {category}: {product.lower()} by {brand}. "
                       f"{offer[0].upper()}{offer[1:]}. Goal: {spec.goal}.")
        record = Ad(ad_id=ad_id, advertiser_id=advertiser, industry=spec.name,
                    bid_type=bid_type, conversion_goal=spec.goal, bid=round(bid, 4),
                    budget=round(budget, 2), title=title, description=description,
                    status="active", created_time=created_time, event_time=event_time)
        v = np.zeros(N_TOPICS)
        v[self._industry_index[spec.name]] = 1.0
        v[self._category_index[(spec.name, category)]] = 1.5
        v += rng.normal(0.0, 0.15, N_TOPICS)
        ad = SimAd(record=record, vector=_unit(v),
                   quality=float(rng.normal(0.0, cfg.ad_quality_sigma)), category=category,
                   number=self._ad_counter)
        self.ads[ad_id] = ad
        self._by_number[ad.number] = ad
        self._matrix_cache = None
        # the ad's own lifecycle stream: candidate times that do not depend on its state
        own = np.random.default_rng(np.random.SeedSequence(cfg.seed,
                                                           spawn_key=(6, ad.number)))
        self._ad_rngs[ad.number] = own
        start = max(event_time, cfg.start_time)
        self._push(self._gap(own, cfg.pause_per_hour, start), ad.number, 0)
        self._push(self._gap(own, cfg.bid_change_per_hour, start), ad.number, 1)
        return ad

    # -- catalog -----------------------------------------------------------------------
    def initial_ads(self) -> list[Ad]:
        """The catalog at the start (to produce to ``ads`` before any traffic)."""
        return list(self._initial)

    def organic_items(self) -> list[OrganicItem]:
        """The organic catalogue (to produce to ``organic-items``), topic by topic."""
        return list(self._organic.values())

    def organic_item(self, item_id: str) -> OrganicItem | None:
        """The catalogue record of ``item_id``; ``None`` if it is not in the catalogue."""
        return self._organic.get(item_id)

    def servable_ads(self) -> list[SimAd]:
        return [a for a in self.ads.values() if a.active]

    def ad_records(self) -> list[Ad]:
        """Current state of every ad (active, paused and exhausted)."""
        return [a.record for a in self.ads.values()]

    def _set_status(self, ad: SimAd, status: str, t: float) -> Ad:
        import msgspec

        ad.record = msgspec.structs.replace(ad.record, status=status, event_time=t)
        self._matrix_cache = None
        return ad.record

    # -- lifecycle ---------------------------------------------------------------------
    @staticmethod
    def _gap(rng: np.random.Generator, per_hour: float, t: float) -> float:
        """``t`` plus an exponential gap at ``per_hour`` events per hour (inf when 0)."""
        return t + float(rng.exponential(3600.0 / per_hour)) if per_hour > 0 else math.inf

    def _push(self, t: float, number: int, kind: int) -> None:
        if math.isfinite(t):
            heapq.heappush(self._lifecycle, (t, number, kind))

    def _revise(self, ad: SimAd, t: float, bid_factor: float, top_up: float) -> Ad:
        """The advertiser changes the bid (× ``bid_factor``, clipped to the bid type's
        range) and tops up the budget (+ ``top_up`` × budget), reactivating an exhausted
        ad whose spend is below the new budget."""
        import msgspec

        r = ad.record
        lo, hi = BID_RANGES[r.bid_type]
        bid = float(np.clip(r.bid * bid_factor, lo, hi))
        budget = r.budget + top_up * r.budget
        status = "active" if r.status == "exhausted" and ad.spend < budget else r.status
        ad.record = msgspec.structs.replace(r, bid=round(bid, 4), budget=round(budget, 2),
                                            status=status, event_time=t)
        self._matrix_cache = None
        return ad.record

    def advance_to(self, t: float) -> list[Ad]:
        """Run the ad lifecycle up to simulated time ``t``; the ads that changed, in order.

        New ads arrive as a Poisson process (``new_ads_per_hour``); each active ad pauses
        at ``pause_per_hour`` and a paused ad resumes after an exponential time
        (``resume_per_hour``); each active or exhausted ad gets a bid/budget revision at
        ``bid_change_per_hour``. Every ad draws its pause and revision candidate times,
        and the variates of each candidate, from its own stream whatever its state (a
        candidate that finds the ad in the wrong state does nothing), so the lifecycle
        of worlds built from one seed stays the same whatever their policies spend.
        """
        cfg = self.config
        changed: list[Ad] = []
        while True:
            t_ev = self._lifecycle[0][0] if self._lifecycle else math.inf
            te = min(self._next_new_ad, t_ev)
            if te > t:
                break
            if self._next_new_ad <= t_ev:
                changed.append(self._new_ad(te, te).record)
                self._next_new_ad = self._gap(self._rng_new_ads, cfg.new_ads_per_hour, te)
                continue
            _, number, kind = heapq.heappop(self._lifecycle)
            ad, own = self._by_number[number], self._ad_rngs[number]
            if kind == 0:      # pause candidate
                pause_s = (float(own.exponential(3600.0 / cfg.resume_per_hour))
                           if cfg.resume_per_hour > 0 else math.inf)
                self._push(self._gap(own, cfg.pause_per_hour, te), number, 0)
                if ad.active:
                    changed.append(self._set_status(ad, "paused", te))
                    self._push(te + pause_s, number, 2)
            elif kind == 1:    # bid-revision candidate
                factor = float(own.lognormal(0.0, cfg.bid_change_sigma))
                top_up = float(own.uniform(0.0, 0.5))
                self._push(self._gap(own, cfg.bid_change_per_hour, te), number, 1)
                if ad.record.status != "paused":
                    changed.append(self._revise(ad, te, factor, top_up))
            elif ad.record.status == "paused":   # resume
                changed.append(self._set_status(ad, "active", te))
        self.now = max(self.now, t)
        return changed

    # -- users -------------------------------------------------------------------------
    def user(self, user_id: str) -> SimUser:
        return self.users[int(user_id.rsplit("-", 1)[1])]

    def _drift(self, user: SimUser, t: float, rng: np.random.Generator) -> None:
        """Exact OU transition of the user's interest from ``user.last_t`` to ``t``."""
        cfg = self.config
        dt = t - user.last_t
        if dt <= 0:
            return
        hours = dt / 3600.0
        if rng.random() < 1.0 - math.exp(-cfg.interest_shift_per_day * hours / 24.0):
            user.mean = _unit(0.5 * user.mean + self._draw_interest_mean(rng, user.age_band))
        decay = math.exp(-cfg.interest_theta_per_hour * hours)
        noise_sd = cfg.interest_sigma * math.sqrt(max(0.0, 1.0 - decay * decay))
        user.state = (user.mean + (user.state - user.mean) * decay
                      + rng.normal(0.0, noise_sd, N_TOPICS))
        user.last_t = t

    def hour_effect(self, t: float) -> np.ndarray:
        """Per-industry additive interest at the hour of day of ``t`` (UTC)."""
        h = (t % 86400.0) / 3600.0
        peaks = np.array([s.peak_hour for s in INDUSTRIES], dtype=float)
        return self.config.hour_amplitude * np.cos(2.0 * math.pi * (h - peaks) / 24.0)

    # -- requests ----------------------------------------------------------------------
    def next_request(self, k: int | None = None) -> Request:
        """The next request of the Poisson arrival process (advances arrival time only)."""
        cfg, rng = self.config, self.rng_arrivals
        self._next_arrival += float(rng.exponential(1.0 / cfg.request_rate))
        t = self._next_arrival
        user = self.users[int(rng.choice(len(self.users), p=self._user_p))]
        device = user.device if rng.random() < 0.8 else str(rng.choice(DEVICES))
        placement = str(rng.choice(PLACEMENTS, p=PLACEMENT_WEIGHTS))
        self._drift(user, t, rng)
        self._consume_organic(user, rng)
        context = {"device": device, "placement": placement,
                   "hour": str(int((t % 86400.0) // 3600.0)), "region": user.region,
                   "age": user.age_band, "interest": user.declared}
        seq = self._seq
        self._seq += 1
        return Request(seq=seq, request_id=f"{cfg.prefix}-{seq:09d}", user_id=user.user_id,
                       context=context, recent_ad_ids=list(user.recent),
                       k=k or cfg.slate_size, event_time=t,
                       recent_organic=list(user.organic), organic_k=cfg.organic_slots)

    def _consume_organic(self, user: SimUser, rng: np.random.Generator) -> None:
        """Organic items the user consumed since their last request, drawn from the
        hidden interest: topic ~ softmax(sharpness · <state, topic vector>), or a
        uniformly random topic with probability ``organic_noise``. The item within the
        topic comes from a hash of the user id and the consumption's sequence number
        (no draw on ``rng``: the topics do not depend on the catalogue's size)."""
        cfg = self.config
        n = int(rng.poisson(cfg.organic_per_request))
        if n == 0:
            return
        logits = cfg.organic_sharpness * (self._cat_vectors @ user.state)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        for _ in range(n):
            if rng.random() < cfg.organic_noise:
                c = int(rng.integers(len(CATEGORIES)))
            else:
                c = int(rng.choice(len(CATEGORIES), p=p))
            self._organic_seq += 1
            n_item = (_stable_hash(f"{user.user_id}#{self._organic_seq}")
                      % cfg.organic_per_topic)
            user.organic.append(f"{ORGANIC_TOPICS[c]}#{n_item}")

    def observable_interest(self, context: dict[str, str],
                            recent_organic: Sequence[str]) -> np.ndarray:
        """Estimate of a user's interest from what a model can see.

        Shrinkage posterior mean: ``(α·prior + Σ v(topic_i)) / (α + n)`` where ``prior``
        is the mean initial interest of users with the same age band and declared
        interest, ``v(topic)`` the unit topic vector of each recent organic item's
        category, ``n`` their number and ``α = 3``.
        """
        prior = self._group_prior.get((context.get("age", ""), context.get("interest", "")),
                                      self._group_prior[("", "")])
        idx = {t: i for i, t in enumerate(ORGANIC_TOPICS)}
        cats = [idx[t] for t in (organic_topic(o) for o in recent_organic) if t in idx]
        alpha = 3.0
        total = alpha * prior + (self._cat_vectors[cats].sum(axis=0) if cats else 0.0)
        return np.asarray(total / (alpha + len(cats)))

    def step_requests(self, n: int, k: int | None = None) -> list[Request]:
        """The next ``n`` requests (without serving them)."""
        return [self.next_request(k) for _ in range(n)]

    def iter_requests(self, k: int | None = None) -> Iterator[Request]:
        while True:
            yield self.next_request(k)

    # -- ground truth ------------------------------------------------------------------
    def _matrix(self, ads: Sequence[SimAd] | None) -> tuple[list[SimAd], np.ndarray]:
        if ads is None:
            if self._matrix_cache is None:
                servable = self.servable_ads()
                mat = (np.stack([a.vector for a in servable]) if servable
                       else np.zeros((0, N_TOPICS)))
                self._matrix_cache = (servable, mat)
            return self._matrix_cache
        ads = list(ads)
        mat = np.stack([a.vector for a in ads]) if ads else np.zeros((0, N_TOPICS))
        return ads, mat

    def _static(self, ads: list[SimAd]) -> tuple[np.ndarray, ...]:
        """Industry index, category index, hidden quality and pCVR bias of ``ads``
        (kept with the servable matrix while the servable set is unchanged)."""
        cached = self._static_cache
        if cached is not None and cached[0] is ads:
            return cached[1]
        cfg = self.config
        out = (np.array([self._industry_index[a.record.industry] for a in ads]),
               np.array([self._cat_of[(a.record.industry, a.category)] for a in ads]),
               np.array([a.quality for a in ads]),
               np.array([cfg.cvr_bias[a.record.bid_type] for a in ads]))
        if self._matrix_cache is not None and ads is self._matrix_cache[0]:
            self._static_cache = (ads, out)
        return out

    def trend_effect(self, t: float) -> np.ndarray:
        """Per-category click-logit trend at time ``t`` (rises and falls over days)."""
        return self.config.trend_amplitude * np.sin(
            2.0 * math.pi * (t - self.config.start_time) / self._trend_period_s
            + self._trend_phase)

    def probabilities(self, user: SimUser | str, context: dict[str, str], t: float,
                      ads: Sequence[SimAd] | None = None,
                      positions: np.ndarray | int = 0,
                      state: np.ndarray | None = None) -> tuple[list[SimAd], Any, Any]:
        """True (pCTR, pCVR) of ``ads`` (default: all servable) for this user and context.

        pCTR includes the position bias of ``positions`` (0 = top), the hour of day,
        region/placement × industry effects, category trends and creative fatigue.
        ``state`` replaces the user's hidden interest (the observable oracle).
        """
        cfg = self.config
        if isinstance(user, str):
            user = self.user(user)
        ads_list, mat = self._matrix(ads)
        if not ads_list:
            return ads_list, np.zeros(0), np.zeros(0)
        affinity = mat @ (user.state if state is None else state)
        hour = self.hour_effect(t)
        ind, cat, quality, cvr_b = self._static(ads_list)
        ctx_bias = (PLACEMENT_BIAS.get(context.get("placement", ""), 0.0)
                    + DEVICE_BIAS.get(context.get("device", ""), 0.0))
        ctx_ind = np.zeros(len(INDUSTRIES))
        if context.get("region") in REGIONS:
            ctx_ind = ctx_ind + self._region_effect[REGIONS.index(context["region"])]
        if context.get("placement") in PLACEMENTS:
            ctx_ind = ctx_ind + self._placement_effect[PLACEMENTS.index(context["placement"])]
        seen = np.array([user.exposure.get(a.ad_id, 0) for a in ads_list], dtype=float)
        imps = np.array([a.impressions for a in ads_list], dtype=float)
        fatigue = (cfg.fatigue_user * np.log1p(seen) + cfg.fatigue_overall
                   * (1.0 - np.exp(-imps / cfg.fatigue_overall_scale)))
        logit = (cfg.ctr_affinity * affinity + hour[ind] + ctx_ind[ind] + quality + ctx_bias
                 + self.trend_effect(t)[cat] - fatigue
                 + cfg.ctr_bias + cfg.position_bias * np.asarray(positions, dtype=float))
        pctr = _sigmoid(logit)
        pcvr = _sigmoid(cfg.cvr_affinity * affinity + cvr_b)
        return ads_list, pctr, pcvr

    @staticmethod
    def expected_values(ads: Sequence[SimAd], pctr: Any, pcvr: Any) -> np.ndarray:
        """Expected reward per impression: cpc bid·pCTR, cpa bid·pCTR·pCVR, cpm bid/1000."""
        bid = np.array([a.record.bid for a in ads], dtype=float)
        kind = [a.record.bid_type for a in ads]
        cpc = np.array([k == "cpc" for k in kind], dtype=bool)
        cpa = np.array([k == "cpa" for k in kind], dtype=bool)
        pctr, pcvr = np.asarray(pctr, dtype=float), np.asarray(pcvr, dtype=float)
        return np.asarray(np.where(cpc, bid * pctr, np.where(cpa, bid * pctr * pcvr,
                                                             bid / 1000.0)))

    def oracle_slate(self, user: SimUser | str, context: dict[str, str],
                     servable_ads: Sequence[SimAd] | None = None, k: int | None = None,
                     t: float | None = None) -> list[str]:
        """The ``k`` ad ids with the highest true expected value per impression."""
        k = k or self.config.slate_size
        t = self.now if t is None else t
        ads, pctr, pcvr = self.probabilities(user, context, t, servable_ads)
        if not ads:
            return []
        ev = self.expected_values(ads, pctr, pcvr)
        order = np.lexsort((np.arange(len(ads)), -ev))[:k]
        return [ads[int(i)].ad_id for i in order]

    def value_table(self, request: Request) -> tuple[list[str], np.ndarray]:
        """True expected value of every servable ad at every slate position for
        ``request`` as the world stands now: (ad ids, values [k, n_ads]). Lets a
        counterfactual slate be scored later against the state the request saw."""
        ads = self._matrix(None)[0]
        rows = [self.expected_values(ads, *self.probabilities(
            request.user_id, request.context, request.event_time, None, pos)[1:])
            for pos in range(request.k)]
        return [a.ad_id for a in ads], (np.stack(rows) if rows and ads
                                        else np.zeros((request.k, len(ads))))

    def observable_oracle_slate(self, request: Request,
                                k: int | None = None) -> list[str]:
        """The ``k`` ads with the highest expected value given only what models see.

        The user's hidden interest is replaced by :meth:`observable_interest` (from the
        request's age band, declared interest and recent organic items); everything
        else (ad quality, trends, fatigue, hour, context effects) is the true world.
        """
        k = k or request.k
        est = self.observable_interest(request.context, request.recent_organic)
        ads, pctr, pcvr = self.probabilities(request.user_id, request.context,
                                             request.event_time, state=est)
        if not ads:
            return []
        ev = self.expected_values(ads, pctr, pcvr)
        order = np.lexsort((np.arange(len(ads)), -ev))[:k]
        return [ads[int(i)].ad_id for i in order]

    # -- responses ---------------------------------------------------------------------
    def response_uniforms(self, seq: int, ads: Sequence[SimAd]) -> np.ndarray:
        """The response variates of request number ``seq`` for ``ads``: ``[len(ads), 9]``
        uniforms in (0, 1), row ``i`` keyed by (seed, request number, ad number) only
        (click, conversion, click delay, conversion-delay mixture and tail, value)."""
        return keyed_uniforms(self.config.seed, 2, seq, [a.number for a in ads], 9)

    def sample_response(self, user: SimUser | str, slate: Sequence[str], request_id: str,
                        event_time: float, context: dict[str, str], seq: int) -> Response:
        """Sample clicks and (delayed) conversions for ``slate`` shown at ``event_time``
        to request number ``seq``.

        Every variate of an (ad, request) pair is keyed by both (:meth:`response_uniforms`):
        the same ad shown to the same request clicks and converts alike whatever its
        neighbours, the serving order or the policy; its position enters only through
        pCTR. Updates spend and budgets (booked at sampling time) and returns ads that
        became ``exhausted``. Unknown or non-active ads get no response.
        """
        cfg = self.config
        if isinstance(user, str):
            user = self.user(user)
        known: list[SimAd] = []
        positions: list[int] = []
        unknown: list[str] = []
        for pos, ad_id in enumerate(slate):
            ad = self.ads.get(ad_id)
            if ad is None or not ad.active:
                unknown.append(ad_id)
                continue
            known.append(ad)
            positions.append(pos)
        items: list[ItemOutcome] = []
        clicks: list[Click] = []
        conversions: list[Conversion] = []
        updates: list[Ad] = []
        if not known:
            return Response(request_id, event_time, items, clicks, conversions, updates, unknown)
        ads, pctr, pcvr = self.probabilities(user, context, event_time, known,
                                             np.array(positions))
        ev = self.expected_values(ads, pctr, pcvr)
        window = cfg.delays.window_s
        uni = self.response_uniforms(seq, ads)
        for i, ad in enumerate(ads):
            r = ad.record
            u = uni[i]
            u_click, u_conv = float(u[0]), float(u[1])
            click_delay = cfg.delays.click_from(float(u[2]))
            conv_delay = cfg.delays.conversion_from(float(u[3]), float(u[4]),
                                                    float(_normal(u[5], u[6])))
            value_draw = math.exp(0.5 * float(_normal(u[7], u[8])))
            clicked = u_click < pctr[i]
            converted = clicked and u_conv < pcvr[i]
            reward = r.bid / 1000.0 if r.bid_type == "cpm" else 0.0
            click_t = conv_t = None
            value = 0.0
            if clicked:
                click_t = event_time + click_delay
                clicks.append(Click(event_id=f"{request_id}:click:{r.ad_id}",
                                    request_id=request_id, user_id=user.user_id,
                                    ad_id=r.ad_id, event_time=click_t))
                user.recent.append(r.ad_id)
                if r.bid_type == "cpc":
                    reward += r.bid
            if converted:
                assert click_t is not None
                conv_t = click_t + conv_delay
                spec = INDUSTRIES[self._industry_index[r.industry]]
                value = round(spec.value_median * value_draw, 2)
                conversions.append(Conversion(
                    event_id=f"{request_id}:conversion:{r.ad_id}", request_id=request_id,
                    user_id=user.user_id, ad_id=r.ad_id, event_time=conv_t, value=value))
                if r.bid_type == "cpa" and conv_t - event_time <= window:
                    reward += r.bid
            items.append(ItemOutcome(
                ad_id=r.ad_id, position=positions[i], pctr=float(pctr[i]),
                pcvr=float(pcvr[i]), expected_value=float(ev[i]), clicked=bool(clicked),
                converted=bool(converted), click_time=click_t, conversion_time=conv_t,
                conversion_value=value, reward=reward))
            ad.spend += reward
            ad.impressions += 1
            user.exposure[r.ad_id] = user.exposure.get(r.ad_id, 0) + 1
            if ad.spend >= r.budget and ad.active:
                updates.append(self._set_status(ad, "exhausted", event_time))
        return Response(request_id, event_time, items, clicks, conversions, updates, unknown)

    def respond(self, request: Request, slate: Sequence[str]) -> Response:
        """The response to ``request`` served ``slate`` (ad ids, top first)."""
        return self.sample_response(request.user_id, slate, request.request_id,
                                    request.event_time, request.context, request.seq)


    # -- organic items of a mixed feed ---------------------------------------------------
    def organic_probabilities(self, user: SimUser | str, item_ids: Sequence[str],
                              positions: np.ndarray | int = 0
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """True (affinity, P(view), P(like | view), median dwell s) of catalogue items
        ``item_ids`` shown at organic ranks ``positions`` to the user as they are now.
        Raises ``KeyError`` for an id outside the catalogue."""
        cfg = self.config
        if isinstance(user, str):
            user = self.user(user)
        if not item_ids:
            empty = np.zeros(0)
            return empty, empty, empty, empty
        cats = np.array([self._organic_cat[i] for i in item_ids])
        quality = np.array([self._organic_quality[i] for i in item_ids])
        affinity = self._cat_vectors[cats] @ user.state
        decay = cfg.organic_position_decay ** np.asarray(positions, dtype=float)
        p_view = decay * _sigmoid(cfg.organic_view_bias + cfg.organic_view_affinity * affinity
                                  + quality)
        p_like = _sigmoid(cfg.organic_like_bias + cfg.organic_like_affinity * affinity
                          + quality)
        median = cfg.organic_dwell_median_s * np.exp(cfg.organic_dwell_affinity * affinity)
        return affinity, p_view, p_like, median

    def organic_expected_engagement(self, request: Request, item_ids: Sequence[str]
                                    ) -> np.ndarray:
        """True expected engagement of catalogue items shown in this order:
        ``P(view at its rank) · (1 + P(like | view))`` (a view counts 1, a like 1 more)."""
        _, p_view, p_like, _ = self.organic_probabilities(
            request.user_id, item_ids, np.arange(len(item_ids)))
        return np.asarray(p_view * (1.0 + p_like))

    def organic_oracle(self, request: Request, m: int | None = None) -> list[str]:
        """The ``m`` (default ``request.organic_k``) catalogue items with the highest true
        expected engagement for the request's user, best first. The rank's position bias
        multiplies every item alike, so the order is by ``sigmoid(view logit) · (1 +
        P(like | view))``; ties go to catalogue order."""
        m = request.organic_k if m is None else m
        if m <= 0:
            return []
        ids = list(self._organic)
        _, p_view, p_like, _ = self.organic_probabilities(request.user_id, ids, 0)
        order = np.lexsort((np.arange(len(ids)), -(p_view * (1.0 + p_like))))[:m]
        return [ids[int(i)] for i in order]

    def organic_uniforms(self, seq: int, item_ids: Sequence[str]) -> np.ndarray:
        """The organic-response variates of request number ``seq`` for catalogue items
        ``item_ids``: ``[len(item_ids), 6]`` uniforms, row ``i`` keyed by (seed, request
        number, item) only (view, like, view delay, dwell (two), like point), on a
        stream apart from the ads' :meth:`response_uniforms`."""
        return keyed_uniforms(self.config.seed, 3, seq,
                              [self._organic_index[i] for i in item_ids], 6)

    def respond_organic(self, request: Request, item_ids: Sequence[str]) -> OrganicResponse:
        """Sample what the user does with the organic items ``item_ids`` (rank order)
        shown with ``request``.

        Each item is viewed with ``P(view)``, a few seconds (``Exp(organic_view_delay_s)``)
        after the impression; a viewed item is liked with ``P(like | view)`` at a uniform
        point of its dwell; one ``dwell`` event at the end of the view carries the
        log-normal dwell seconds. Viewed items join the user's organic history. Ids outside
        the catalogue, and repeats, get no response and are listed in
        ``unknown_item_ids``.
        """
        cfg = self.config
        user = self.user(request.user_id)
        known: list[str] = []
        positions: list[int] = []
        unknown: list[str] = []
        for pos, item_id in enumerate(item_ids):
            if item_id not in self._organic or item_id in known:
                unknown.append(item_id)
                continue
            known.append(item_id)
            positions.append(pos)
        affinity, p_view, p_like, median = self.organic_probabilities(
            user, known, np.array(positions, dtype=float))
        rid, t0 = request.request_id, request.event_time
        items: list[OrganicOutcome] = []
        events: list[OrganicEngagement] = []
        uni = self.organic_uniforms(request.seq, known)
        for i, item_id in enumerate(known):
            u = uni[i]
            u_view, u_like = float(u[0]), float(u[1])
            delay = -cfg.organic_view_delay_s * math.log(float(u[2]))
            z = float(_normal(u[3], u[4]))
            like_frac = float(u[5])
            viewed = u_view < p_view[i]
            liked = viewed and u_like < p_like[i]
            dwell = 0.0
            view_t: float | None = None
            if viewed:
                view_t = t0 + delay
                dwell = round(float(median[i]) * math.exp(cfg.organic_dwell_sigma * z), 3)
                events.append(OrganicEngagement(
                    event_id=f"{rid}:view:{item_id}", request_id=rid,
                    user_id=user.user_id, item_id=item_id, action="view", event_time=view_t))
                if liked:
                    events.append(OrganicEngagement(
                        event_id=f"{rid}:like:{item_id}", request_id=rid,
                        user_id=user.user_id, item_id=item_id, action="like",
                        event_time=view_t + like_frac * dwell))
                events.append(OrganicEngagement(
                    event_id=f"{rid}:dwell:{item_id}", request_id=rid,
                    user_id=user.user_id, item_id=item_id, action="dwell", dwell_s=dwell,
                    event_time=view_t + dwell))
                user.organic.append(item_id)
            items.append(OrganicOutcome(
                item_id=item_id, position=positions[i], affinity=float(affinity[i]),
                p_view=float(p_view[i]), p_like=float(p_like[i]),
                expected_engagement=float(p_view[i] * (1.0 + p_like[i])),
                viewed=bool(viewed), liked=bool(liked), dwell_s=dwell, view_time=view_t))
        events.sort(key=lambda e: e.event_time)
        return OrganicResponse(rid, t0, items, events, unknown)


def slate_ids(items: Iterable[Any]) -> list[str]:
    """Ad ids of slate items (dicts or objects with ``ad_id``/``position``), top first."""
    rows: list[tuple[int, int, str]] = []
    for n, item in enumerate(items):
        if isinstance(item, dict):
            pos, ad_id = item.get("position"), item["ad_id"]
        else:
            pos, ad_id = getattr(item, "position", None), item.ad_id
        rows.append((n if pos is None else int(pos), n, str(ad_id)))
    rows.sort()
    return [r[2] for r in rows]
