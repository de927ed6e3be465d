"""Writes ``logged_bandit.jsonl``: a small logged-bandit log in the recorded format.

A uniform-random logging policy shows slates of up to 3 of 24 ads (each item's
propensity is 1/24: the chance that uniform sampling without replacement puts that ad
at that position); users carry their own features (``segment``, ``device``; no hour,
placement or region); each ad appeals to one segment (click probability 0.35 there,
0.03 elsewhere). Half of the ads have an ``ad`` line, the others only appear in slates.
Run ``python tests/data/make_logged_bandit.py`` to regenerate (seeded, byte-identical).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_ADS, N_USERS, N_REQUESTS, SEGMENTS = 24, 60, 500, ("a", "b", "c", "d")
START = 1_704_067_200.0
OUT = Path(__file__).with_name("logged_bandit.jsonl")


def main() -> None:
    rng = np.random.default_rng(7)
    ad_segment = [SEGMENTS[i % len(SEGMENTS)] for i in range(N_ADS)]
    users = [(f"user-{u:03d}", SEGMENTS[int(rng.integers(len(SEGMENTS)))],
              ("mobile", "desktop")[int(rng.integers(2))]) for u in range(N_USERS)]
    lines: list[dict[str, object]] = []
    for i in range(0, N_ADS, 2):
        lines.append({"type": "ad", "t": START, "ad_id": f"item-{i:02d}",
                      "advertiser_id": f"shop-{i % 5}", "industry": "retail",
                      "bid_type": "cpc", "conversion_goal": "purchase", "bid": 1.0,
                      "budget": 1e9, "title": f"Item {i} for segment {ad_segment[i]}",
                      "description": f"Catalog item {i}"})
    t = START
    for r in range(N_REQUESTS):
        t += float(rng.exponential(20.0))
        uid, seg, device = users[int(rng.integers(N_USERS))]
        k = int(rng.integers(1, 4))
        shown = rng.choice(N_ADS, size=k, replace=False)
        rid = f"log-{r:05d}"
        slate = [{"ad_id": f"item-{a:02d}", "semantic_id": [], "position": p, "score": 0.0,
                  "bid": 1.0, "bid_type": "cpc", "propensity": round(1.0 / N_ADS, 6)}
                 for p, a in enumerate(shown)]
        lines.append({"type": "impression", "t": round(t, 3), "request_id": rid,
                      "user_id": uid, "context": {"segment": seg, "device": device},
                      "slate": slate, "model_version": "logging-uniform"})
        for a in shown:
            p_click = 0.35 if ad_segment[int(a)] == seg else 0.03
            if rng.random() < p_click:
                ct = round(t + float(rng.exponential(3.0)), 3)
                lines.append({"type": "click", "t": ct, "event_id": f"{rid}:click:{a}",
                              "request_id": rid, "user_id": uid, "ad_id": f"item-{a:02d}"})
    lines.sort(key=lambda e: float(e["t"]))  # type: ignore[arg-type]
    with OUT.open("w") as fh:
        for e in lines:
            fh.write(json.dumps(e, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
