"""The observable interest path: organic history from the contracts to the encoder."""

from __future__ import annotations

import json

import numpy as np
import torch

from learner.model import GenerativeRecommender, ModelConfig
from learner.rspo_step import lists_to_batch
from learner.tokenizer import UASIDTokenizer
from streams.features import (
    DEFAULT_CONTEXT_FEATURES,
    context_ids,
    hash_feature,
    organic_ids,
    request_ids,
)
from streams.schemas import Feedback, FeedbackItem, Impression, decode, encode


def _feedback(tok: UASIDTokenizer, organic: list[str]) -> Feedback:
    ad = next(iter(tok.table()))
    item = FeedbackItem(ad_id=ad, semantic_id=list(tok.ids_of(ad)), position=0, score=0.0,
                        bid=1.0, bid_type="cpc", clicked=True, reward=1.0)
    return Feedback(request_id="r1", user_id="u1", kind="final", revision=0,
                    impression_time=10.0, event_time=20.0, elapsed_s=10.0, window_closed=True,
                    context={"device": "mobile", "age": "18-24"}, recent_organic=organic,
                    items=[item])


def test_records_without_organic_history_stay_readable() -> None:
    old = {"request_id": "r", "event_time": 1.0, "user_id": "u", "slate": [],
           "model_version": "v1"}
    imp = decode(json.dumps(old).encode(), Impression)
    assert isinstance(imp, Impression) and imp.recent_organic == []
    new = Impression(request_id="r", event_time=1.0, user_id="u", slate=[], model_version="v1",
                     recent_organic=["retail/headphones#7"])
    back = decode(encode(new), Impression)
    assert isinstance(back, Impression) and back.recent_organic == ["retail/headphones#7"]


def test_request_ids_put_organic_topics_after_the_context_most_recent_first() -> None:
    ctx = {"device": "mobile", "interest": "gaming"}
    row = request_ids(ctx, ["a/x#1", "b/y#2", "a/x#3"], organic_len=4)
    C = len(DEFAULT_CONTEXT_FEATURES)
    assert row[:C] == context_ids(ctx)
    assert row[C:] == [hash_feature("organic", "a/x"), hash_feature("organic", "b/y"),
                       hash_feature("organic", "a/x"), 0]
    assert organic_ids([f"t{i}#{i}" for i in range(30)], 3) == [
        hash_feature("organic", f"t{i}") for i in (29, 28, 27)]


def test_the_organic_history_reaches_the_encoder(small_tokenizer: UASIDTokenizer) -> None:
    cfg = ModelConfig(level_sizes=small_tokenizer.config.token_sizes,
                      semantic_levels=small_tokenizer.config.semantic_levels, history_len=5,
                      d_model=32, n_head=4, n_enc_layer=1, n_layer=2, n_top=1, organic_len=6)
    torch.manual_seed(0)
    model = GenerativeRecommender(cfg).eval()
    none = lists_to_batch([(_feedback(small_tokenizer, []), 1.0)], small_tokenizer, model)
    some = lists_to_batch([(_feedback(small_tokenizer, ["gaming/consoles#1",
                                                        "travel/flights#2"]), 1.0)],
                          small_tokenizer, model)
    C = len(cfg.context_features)
    assert none.context.shape == some.context.shape == (1, C + 6)
    assert np.count_nonzero(some.context[0, C:].numpy()) == 2
    assert np.count_nonzero(none.context[0, C:].numpy()) == 0
    with torch.no_grad():
        m0, mask0, *_ = model.encode(none.history, none.history_mask, none.context)
        m1, mask1, *_ = model.encode(some.history, some.history_mask, some.context)
    assert mask0[0, -6:].sum() == 0 and mask1[0, -6:].sum() == 2
    user0 = (m0 * mask0.unsqueeze(-1)).sum(1) / mask0.sum()
    user1 = (m1 * mask1.unsqueeze(-1)).sum(1) / mask1.sum()
    assert not torch.allclose(user0, user1, atol=1e-4)   # what the user watched matters
