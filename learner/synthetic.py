"""A small synthetic ad log for tests and benchmarks, deterministic by seed.

Ground truth: each ad belongs to one category (its text says which) and has a
hidden quality; each user has one or two interest categories. A request shows a
slate mixing ads from the user's interests and random ads; the user clicks with
probability sigmoid(3·interest + log quality - 2.5), and a clicked CPA ad converts
with probability 0.3. Some creatives are duplicated under a different bid type and
conversion goal (same text, different commercial setup) to exercise UA-SID.

This is not the traffic simulator (that lives in ``streams/``); it only needs to be
small, self-contained and learnable. Records are the real event types
(:class:`streams.schemas.Ad`, :class:`streams.schemas.Feedback`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streams.schemas import Ad, Feedback, FeedbackItem, encode

CATEGORIES: dict[str, tuple[str, list[str]]] = {
    # category: (industry, product words)
    "running shoes": ("apparel", ["trail runners", "marathon sneakers", "track spikes"]),
    "coffee": ("food", ["espresso beans", "cold brew", "drip coffee maker"]),
    "smartphone": ("electronics", ["flagship phone", "budget phone", "phone case"]),
    "hotel": ("travel", ["beach resort", "city hotel", "ski lodge"]),
    "insurance": ("finance", ["car insurance", "travel insurance", "pet insurance"]),
    "mobile game": ("gaming", ["puzzle game", "strategy game", "racing game"]),
    "skincare": ("beauty", ["face serum", "sunscreen", "night cream"]),
    "online course": ("education", ["python course", "language lessons", "design class"]),
    "furniture": ("home", ["office chair", "sofa bed", "standing desk"]),
    "headphones": ("electronics", ["noise cancelling headphones", "earbuds", "studio monitors"]),
    "pet food": ("pets", ["dog kibble", "cat treats", "aquarium flakes"]),
    "car rental": ("travel", ["airport car rental", "van hire", "electric car rental"]),
}
OFFERS = ["free shipping", "half price today", "limited edition", "new arrivals",
          "members save more", "try it free"]
GOALS = {"cpc": ["click"], "cpa": ["purchase", "app_install", "lead"], "cpm": ["awareness"]}
DEVICES, PLACEMENTS, REGIONS = ["ios", "android", "web"], ["feed", "search", "splash"], \
    ["north", "south", "east", "west"]


@dataclass
class SyntheticLog:
    ads: list[Ad]
    feedback: list[Feedback]
    ad_category: dict[str, int]
    user_interests: dict[str, list[int]]


def generate(n_ads: int = 120, n_users: int = 60, n_requests: int = 1500, slate_size: int = 6,
             n_categories: int = 8, duplicate_frac: float = 0.1, history_len: int = 20,
             seed: int = 0) -> SyntheticLog:
    """Ads, users and ``n_requests`` final feedback records (one per request)."""
    rng = np.random.default_rng(seed)
    cats = list(CATEGORIES)[: max(1, min(n_categories, len(CATEGORIES)))]
    ads: list[Ad] = []
    ad_cat: dict[str, int] = {}
    quality: list[float] = []
    n_dup = int(n_ads * duplicate_frac)
    for i in range(n_ads - n_dup):
        c = int(rng.integers(len(cats)))
        industry, products = CATEGORIES[cats[c]]
        product = products[int(rng.integers(len(products)))]
        bid_type = ["cpc", "cpa", "cpm"][int(rng.choice(3, p=[0.5, 0.4, 0.1]))]
        goal = GOALS[bid_type][int(rng.integers(len(GOALS[bid_type])))]
        brand = f"brand{int(rng.integers(40))}"
        ads.append(Ad(
            ad_id=f"ad-{i}", advertiser_id=brand, industry=industry, bid_type=bid_type,  # type: ignore[arg-type]
            conversion_goal=goal, bid=_bid(rng, bid_type), budget=1000.0,
            title=f"{brand} {product}",
            description=f"{OFFERS[int(rng.integers(len(OFFERS)))]} on {cats[c]}: {product}",
            created_time=0.0, event_time=0.0))
        ad_cat[ads[-1].ad_id] = c
        quality.append(float(rng.lognormal(0.0, 0.8)))
    for j in range(n_dup):  # same creative, different commercial setup
        src = ads[int(rng.integers(n_ads - n_dup))]
        bid_type = "cpa" if src.bid_type != "cpa" else "cpc"
        goal = GOALS[bid_type][j % len(GOALS[bid_type])]
        ads.append(Ad(ad_id=f"ad-{n_ads - n_dup + j}", advertiser_id=src.advertiser_id,
                      industry=src.industry, bid_type=bid_type, conversion_goal=goal,  # type: ignore[arg-type]
                      bid=_bid(rng, bid_type), budget=1000.0, title=src.title,
                      description=src.description, created_time=0.0, event_time=0.0))
        ad_cat[ads[-1].ad_id] = ad_cat[src.ad_id]
        quality.append(quality[int(src.ad_id.split("-")[1])])
    q = np.array(quality)
    cat_of = np.array([ad_cat[a.ad_id] for a in ads])
    by_cat = [np.flatnonzero(cat_of == c) for c in range(len(cats))]

    users = [f"user-{u}" for u in range(n_users)]
    interests: dict[str, list[int]] = {}
    history: dict[str, list[str]] = {}
    for u in users:
        k = 1 + int(rng.random() < 0.4)
        interests[u] = [int(c) for c in rng.choice(len(cats), size=k, replace=False)]
        seed_ads = [_popular(rng, by_cat[int(rng.choice(interests[u]))], q) for _ in range(3)]
        history[u] = [ads[i].ad_id for i in seed_ads]

    feedback: list[Feedback] = []
    t = 1_700_000_000.0
    for r in range(n_requests):
        u = users[int(rng.integers(n_users))]
        t += float(rng.exponential(2.0))
        half = slate_size // 2
        slate_idx = [_popular(rng, by_cat[int(rng.choice(interests[u]))], q) for _ in range(half)]
        slate_idx += [int(i) for i in rng.integers(len(ads), size=slate_size - half)]
        slate_idx = list(dict.fromkeys(slate_idx))
        context = {"device": DEVICES[int(rng.integers(3))],
                   "placement": PLACEMENTS[int(rng.integers(3))],
                   "hour": str(int(rng.integers(24))), "region": REGIONS[int(rng.integers(4))]}
        items = []
        for pos, i in enumerate(slate_idx):
            ad = ads[i]
            interest = 1.0 if cat_of[i] in interests[u] else 0.0
            p_click = 1.0 / (1.0 + math.exp(-(3.0 * interest + math.log(q[i]) - 2.5)))
            clicked = bool(rng.random() < p_click)
            converted = bool(clicked and ad.bid_type == "cpa" and rng.random() < 0.3)
            value = float(round(rng.uniform(5, 50), 2)) if converted else 0.0
            reward = (ad.bid * clicked if ad.bid_type == "cpc"
                      else ad.bid * converted if ad.bid_type == "cpa" else ad.bid / 1000.0)
            items.append(FeedbackItem(ad_id=ad.ad_id, semantic_id=[], position=pos, score=0.0,
                                      bid=ad.bid, bid_type=ad.bid_type, clicked=clicked,
                                      converted=converted, conversion_value=value,
                                      reward=float(reward)))
        feedback.append(Feedback(
            request_id=f"req-{r}", user_id=u, kind="final", revision=0, impression_time=t,
            event_time=t + 3600.0, elapsed_s=3600.0, window_closed=True, context=context,
            recent_ad_ids=list(history[u][:history_len]), model_version="synthetic",
            items=items))
        clicked_now = [it.ad_id for it in items if it.clicked]
        history[u] = (clicked_now[::-1] + history[u])[:history_len]  # most recent first
    return SyntheticLog(ads, feedback, ad_cat, interests)


def _bid(rng: np.random.Generator, bid_type: str) -> float:
    return float(round({"cpc": rng.uniform(0.2, 2.0), "cpa": rng.uniform(5.0, 40.0),
                        "cpm": rng.uniform(1.0, 10.0)}[bid_type], 2))


def _popular(rng: np.random.Generator, pool: np.ndarray, q: np.ndarray) -> int:
    p = q[pool] / q[pool].sum()
    return int(pool[int(rng.choice(len(pool), p=p))])


def write_jsonl(records: Iterable[Ad | Feedback], path: str | Path) -> Path:
    """One JSON record per line (``streams.schemas.encode``)."""
    path = Path(path)
    with open(path, "wb") as f:
        for rec in records:
            f.write(encode(rec) + b"\n")
    return path


def ad_categories(log: SyntheticLog, ad_ids: Sequence[str]) -> list[int]:
    return [log.ad_category[a] for a in ad_ids]
