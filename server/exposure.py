"""What each user has been shown: per (user, ad) impression counts, the fatigue feature.

A user who has seen an ad ``n`` times clicks it less (creative fatigue). The server is
the one place that knows what it served, so it keeps the counts: an LRU of users, per
user the ads shown and how often. :class:`server.engine.Engine` reads the counts of a
request's candidates (value.onnx's ``exposure`` input, docs/snapshot-format.md), writes
each served item's count on the impression (``SlateItem.exposure``, the count *before*
this impression; the joiner copies it to the feedback the learner trains on) and adds
the served slate. The harness's learned baselines count what they serve with the same
class, so every policy is fed the same feature.

Counts live in the process: a restarted server starts from zero, and with replicas a
user's requests must reach one replica (balance on the user id) or each replica sees
only its share (server/README.md). A user beyond ``max_users`` (least recently served
first) or an ad beyond ``max_ads_per_user`` for a user (least recently shown first) is
forgotten, and counts again from zero.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

from streams.schemas import Feedback


class ExposureCounter:
    """Impressions per (user, ad) so far; thread-safe (the model workers share one)."""

    def __init__(self, max_users: int = 200_000, max_ads_per_user: int = 512) -> None:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        if max_ads_per_user < 1:
            raise ValueError(f"max_ads_per_user must be >= 1, got {max_ads_per_user}")
        self.max_users = max_users
        self.max_ads_per_user = max_ads_per_user
        self._users: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        """Copies and pickles hold the counts, not the lock (a copy gets its own)."""
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Users tracked."""
        return len(self._users)

    def counts(self, user_id: str, ad_ids: Sequence[str]) -> np.ndarray:
        """How often each of ``ad_ids`` was shown to ``user_id`` [len(ad_ids)] float32."""
        with self._lock:
            seen = self._users.get(user_id)
            if not seen:
                return np.zeros(len(ad_ids), np.float32)
            return np.fromiter((seen.get(a, 0) for a in ad_ids), np.float32,
                               count=len(ad_ids))

    def record(self, user_id: str, ad_ids: Iterable[str]) -> None:
        """One more impression of each of ``ad_ids`` to ``user_id``."""
        with self._lock:
            seen = self._users.get(user_id)
            if seen is None:
                seen = self._users[user_id] = {}
                while len(self._users) > self.max_users:
                    self._users.popitem(last=False)
            else:
                self._users.move_to_end(user_id)
            for a in ad_ids:
                n = seen.pop(a, 0) + 1          # re-inserted last: most recently shown
                seen[a] = n
            while len(seen) > self.max_ads_per_user:
                del seen[next(iter(seen))]

    def record_feedback(self, lists: Iterable[Feedback]) -> None:
        """Count the shown items of feedback lists (a log the counts start from)."""
        for fb in sorted(lists, key=lambda f: (f.impression_time, f.request_id)):
            self.record(fb.user_id, [it.ad_id for it in fb.items])
