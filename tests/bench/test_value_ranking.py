"""``bench/value_ranking.py`` takes terms out of a trained value head to say which of
them carries its ranking: what is left after each variant must be what its name says."""

from __future__ import annotations

import torch

from bench.value_ranking import TERMS, without_terms
from learner.model import GenerativeRecommender
from tests.learner.conftest import tiny_inputs, tiny_model
from tests.learner.test_value_model import _random_match_tables


def _head_logits(model: GenerativeRecommender, ctx: torch.Tensor, hist: torch.Tensor,
                 mask: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        memory, mmask = model.encoder(hist, mask, ctx)
        ctr, cvr = model.value(memory, mmask, cands, context=ctx)
    return torch.stack([ctr, cvr], -1).reshape(-1, 2)


def _every_term_random() -> GenerativeRecommender:
    model = tiny_model(seed=3, value_wide=True, value_topic_match=True, value_match_dim=8)
    head, g = model.value, torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in head.linear_tables().values():
            t.normal_(0.0, 1.0, generator=g)
        head.prior_logit.normal_(0.0, 1.0, generator=g)
    _random_match_tables(model)
    return model


def test_prior_only_leaves_one_logit_per_industry_and_goal_cell() -> None:
    model = _every_term_random()
    hist, mask, ctx, _, cands = tiny_inputs(model, B=6)
    biz = model.value.biz
    assert biz is not None
    cells = cands[..., list(biz)].reshape(-1, 2)

    def per_cell_spread(m: GenerativeRecommender) -> float:
        logits = _head_logits(m, ctx, hist, mask, cands)
        spread = 0.0
        for cell in cells.unique(dim=0):
            rows = logits[(cells == cell).all(-1)]
            spread = max(spread, float((rows.max(0).values - rows.min(0).values).max()))
        return spread

    assert per_cell_spread(model) > 0.1
    assert per_cell_spread(without_terms(model, TERMS["match_and_prior"])) > 0.01
    assert per_cell_spread(without_terms(model, TERMS["prior_only"])) < 1e-5


def test_taking_the_topic_match_out_changes_only_the_match_term() -> None:
    model = _every_term_random()
    hist, mask, ctx, _, cands = tiny_inputs(model, B=4)
    head = model.value
    with torch.no_grad():
        match = head.topic_match(ctx, cands)[..., None] * head.wide_match[0]
    full = _head_logits(model, ctx, hist, mask, cands)
    out = _head_logits(without_terms(model, TERMS["without_match"]), ctx, hist, mask, cands)
    scale = head.calibration[:, 0]
    torch.testing.assert_close(full - out, (match * scale).reshape(-1, 2),
                               rtol=1e-4, atol=1e-5)
    assert float(match.abs().max()) > 0.01
