"""The value head's topic match: the vectors it reads, kept up to date.

:meth:`learner.model.ValueHead.topic_match` scores how well a candidate's content
matches the user's recent organic topics. It reads tables that are not learned by
gradient but filled from text, with the tokenizer's encoder and latent map:

- each organic topic's text (``"retail/running-shoes"`` read as ``"retail running
  shoes"``) at the topic's hashed context bucket, and in the normaliser's list of
  known topics;
- each ad's own text ("title. description") at its value bucket;
- the semantic codebooks, whose sum over an id's codes stands in for the content of
  an item that has no vector of its own yet.

:func:`fill_topic_match` fills what is missing: pretraining calls it for the
catalogue and the logged topics, and the online learners (the learner service, the
closed-loop harness) before each update, for the ads and topics that arrived since.
Without it a new ad falls back to its codes and a new topic matches nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from learner.embeddings import ad_text, embed_ads
from learner.model import GenerativeRecommender
from learner.tokenizer import UASIDTokenizer
from streams.features import hash_feature, organic_topic
from streams.schemas import Feedback


def topic_text(topic: str) -> str:
    """The text a topic is embedded from: its path with the separators as spaces."""
    return topic.replace("/", " ").replace("-", " ").replace("_", " ")


def ad_category(description: str) -> str:
    """The category word of an ad's description (``"<Industry> · <category>: ..."``);
    "" when it has none."""
    head = description.split(":", 1)[0]
    return head.split("·", 1)[1].strip() if "·" in head else ""


def ad_topic(ad: Any) -> str:
    """The organic topic an ad's content is on, ``<industry>/<category>`` (the category
    of :func:`ad_category`, lower case, spaces as hyphens); "" when it has none."""
    get = ad.get if isinstance(ad, dict) else (lambda k, d="": getattr(ad, k, d))
    category = ad_category(str(get("description", ""))).lower().replace(" ", "-")
    return f"{get('industry', '')}/{category}" if category else ""


def _ad_id(ad: Any) -> str | None:
    """The id of an ad record (an object or a mapping), without validating the rest."""
    out = ad.get("ad_id") if isinstance(ad, dict) else getattr(ad, "ad_id", None)
    return out if isinstance(out, str) else None


def _unit(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6))


@torch.no_grad()
def fill_topic_match(model: GenerativeRecommender, tok: UASIDTokenizer,
                     feedback: Sequence[Feedback] = (), ads: Iterable[Any] = ()
                     ) -> dict[str, int]:
    """Fill the topic match's tables of ``model``'s value head (a no-op without
    ``value_topic_match``): the codebooks, the vector of every ad of ``ads`` the
    tokenizer knows whose row is still empty, and every organic topic of ``feedback``
    not seen before. Returns the counts added (``ads``, ``topics``)."""
    head = model.value
    if not head.match:
        return {"ads": 0, "topics": 0}
    for cb, off in zip(tok.codebooks, head.code_offsets, strict=False):
        head.code_vec[off:off + cb.shape[0]] = torch.from_numpy(cb)
    # only ads the tokenizer placed: a record it refused (missing attributes, ...) has
    # no id, and is skipped here as everywhere else
    known = [(a, i) for a in ads if (i := _ad_id(a)) is not None and i in tok]
    rows = (head.bucket(torch.tensor([tok.ids_of(i) for _, i in known]))
            if known else torch.zeros(0, dtype=torch.long))
    empty = [k for k, r in enumerate(rows.tolist()) if not bool(head.item_vec[r].any())]
    if empty:
        own = tok.latent(embed_ads([ad_text(known[k][0]) for k in empty],
                                   tok.config.encoder))
        head.item_vec[rows[empty]] = _unit(own).to(head.item_vec.dtype)
    buckets = model.cfg.context_buckets
    topics = sorted({organic_topic(i) for fb in feedback for i in fb.recent_organic})
    if head.exact:
        for (a, _), r in zip(known, rows.tolist(), strict=True):
            topic = ad_topic(a)
            if topic:
                head.item_topic[r] = hash_feature("organic", topic, buckets)
        for t in topics:
            head.topic_industry[hash_feature("organic", t, buckets)] = \
                tok.industry.table.get(t.split("/", 1)[0], 0)
    new = [t for t in topics
           if not bool(head.topic_vec[hash_feature("organic", t, buckets)].any())]
    if new:
        text = tok.latent(embed_ads([topic_text(t) for t in new], tok.config.encoder))
        vecs = _unit(text).to(head.topic_vec.dtype)
        n = int(head.known_mask.sum())
        room = int(head.known_topics.shape[0]) - n
        for t, v in zip(new, vecs, strict=True):
            head.topic_vec[hash_feature("organic", t, buckets)] = v
        take = min(room, len(new))
        head.known_topics[n:n + take] = vecs[:take]
        head.known_mask[n:n + take] = 1.0
    return {"ads": len(empty), "topics": len(new)}
