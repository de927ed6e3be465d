"""Feature hashing shared by the learner (torch) and the server (numpy only).

Context features arrive as ``dict[str, str]`` on requests and events. Each feature
named in a model's manifest becomes one integer id in ``[1, buckets)``; id 0 means
"missing". The hash is stable across processes and Python versions (blake2b),
unlike ``hash()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

DEFAULT_CONTEXT_FEATURES: tuple[str, ...] = ("device", "placement", "hour", "region", "age",
                                              "interest")
DEFAULT_CONTEXT_BUCKETS = 1024
DEFAULT_ORGANIC_LEN = 20
"""Recent organic items a model reads (most recent first); 0 turns the input off."""


def hash_feature(name: str, value: str, buckets: int = DEFAULT_CONTEXT_BUCKETS) -> int:
    """Stable id of ``name=value`` in ``[1, buckets)``."""
    digest = hashlib.blake2b(f"{name}={value}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


def context_ids(context: Mapping[str, str],
                features: Sequence[str] = DEFAULT_CONTEXT_FEATURES,
                buckets: int = DEFAULT_CONTEXT_BUCKETS) -> list[int]:
    """One id per feature in ``features`` order; 0 where the feature is absent."""
    return [hash_feature(f, context[f], buckets) if f in context else 0 for f in features]


def organic_topic(item_id: str) -> str:
    """The topic token of an organic item id (``<topic>#<n>``, e.g.
    ``retail/running-shoes#123``); an id without ``#`` is its own topic."""
    return item_id.split("#", 1)[0]


def organic_ids(recent_organic: Sequence[str], length: int,
                buckets: int = DEFAULT_CONTEXT_BUCKETS) -> list[int]:
    """Hashed topic ids of the ``length`` most recent organic items, most recent first
    (``recent_organic`` is oldest first), zero-padded: ``hash_feature("organic", topic)``."""
    recent = list(recent_organic)[::-1][:length]
    ids = [hash_feature("organic", organic_topic(i), buckets) for i in recent]
    return ids + [0] * (length - len(ids))


def request_ids(context: Mapping[str, str], recent_organic: Sequence[str],
                features: Sequence[str] = DEFAULT_CONTEXT_FEATURES,
                buckets: int = DEFAULT_CONTEXT_BUCKETS,
                organic_len: int = DEFAULT_ORGANIC_LEN) -> list[int]:
    """The model's ``context`` input row: :func:`context_ids` (C values) followed by
    :func:`organic_ids` (``organic_len`` values). Learner and server both build it here."""
    return context_ids(context, features, buckets) + organic_ids(recent_organic, organic_len,
                                                                buckets)
