"""HEPO over sibling beams: the advantages, the clipped-ratio loss, the logged beams in the
learner's batches and one update of the real model (no Kafka)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import torch

from learner import synthetic
from learner.beam import IdTrie
from learner.pretrain import PretrainResult
from learner.rspo import RSPOConfig, hepo_loss, sibling_advantages
from learner.rspo_step import OnlineLearner, lists_to_batch
from streams.schemas import BeamCandidate, Feedback, FeedbackItem


def _groups(ids: list[tuple[int, ...]], level: int) -> dict[tuple[int, ...], list[int]]:
    out: dict[tuple[int, ...], list[int]] = {}
    for k, row in enumerate(ids):
        out.setdefault(row[:level], []).append(k)
    return out


def test_advantages_sum_to_zero_over_every_sibling_group() -> None:
    gen = torch.Generator().manual_seed(3)
    B, J, T = 4, 12, 3
    ids = torch.randint(0, 3, (B, J, T), generator=gen)
    rewards = torch.rand(B, J, generator=gen) * 5
    mask = torch.ones(B, J)
    mask[1, 9:] = 0                                           # padding takes no part
    mask[3, :] = 0
    adv = sibling_advantages(ids, rewards, mask)
    assert torch.all(adv[mask == 0] == 0)
    nonzero = 0
    for b in range(B):
        real = [k for k in range(J) if mask[b, k] > 0]
        rows = [tuple(ids[b, k].tolist()) for k in real]
        for level in range(T):
            for members in _groups(rows, level).values():
                ks = [real[i] for i in members]
                total = float(adv[b, ks, level].sum())
                assert abs(total) < 1e-9, (b, level, ks, total)
                nonzero += int((adv[b, ks, level] != 0).sum())
    assert nonzero > 0


def test_advantage_is_the_childs_mean_over_the_groups_mean_in_group_std() -> None:
    ids = torch.tensor([[[0, 0], [0, 1], [0, 1], [1, 0]]])
    rewards = torch.tensor([[6.0, 2.0, 4.0, 0.0]])
    adv = sibling_advantages(ids, rewards, torch.ones(1, 4))[0]
    r = np.array([6.0, 2.0, 4.0, 0.0])
    # level 0: everyone is a sibling; children {0,1,2} (mean 4) and {3} (mean 0)
    std0 = r.std()
    assert np.allclose(adv[:, 0].numpy(), [(4 - 3) / std0] * 3 + [(0 - 3) / std0])
    # level 1 under prefix (0,): children {0} (6) and {1,2} (3); group mean 4
    std1 = r[:3].std()
    assert np.allclose(adv[:3, 1].numpy(), [(6 - 4) / std1, (3 - 4) / std1, (3 - 4) / std1])
    assert adv[3, 1] == 0                                     # a group of one


def test_a_group_of_one_and_a_group_of_equal_rewards_get_no_advantage() -> None:
    ids = torch.tensor([[[0, 0, 0], [1, 0, 0], [1, 1, 0]], [[2, 3, 4], [0, 0, 0], [0, 0, 0]]])
    rewards = torch.tensor([[1.0, 5.0, 5.0], [7.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = sibling_advantages(ids, rewards, mask)
    assert torch.all(adv[0, 0, 1:] == 0)      # beam 0 is alone under (0,) from level 1 on
    assert torch.all(adv[0, 1:, 1:] == 0)     # beams 1, 2 split at level 1 with equal rewards
    assert adv[0, 0, 0] < 0 < adv[0, 1, 0]    # level 0 does split them: 1 < 5
    assert torch.all(adv[1] == 0)             # a request with one beam


def test_the_gradient_raises_the_better_siblings_token_where_the_siblings_split() -> None:
    # two beams share level 0, split at level 1, then each is alone
    ids = torch.tensor([[[4, 1, 0], [4, 2, 0], [5, 0, 0]]])
    rewards = torch.tensor([[3.0, 1.0, 0.5]])
    mask = torch.ones(1, 3)
    level_logp = torch.full((1, 3, 3), -1.0, requires_grad=True)
    loss, stats = hepo_loss(level_logp, level_logp.detach().clone(), ids, rewards, mask)
    loss.backward()
    g = level_logp.grad[0]  # type: ignore[index]
    assert g[0, 1] < 0 < g[1, 1]                  # descent raises the better sibling
    assert torch.all(g[:, 2] == 0)                # groups of one: no credit
    assert g[0, 0] == g[1, 0] and g[0, 0] < 0 < g[2, 0]   # level 0: branch 4 (mean 2) > 5
    assert stats["hepo_tokens"] == 5
    # outside the clip range the ratio stops pulling (PPO): the better token at ratio 2
    far = level_logp.detach().clone()
    far[0, 0, 1] = far[0, 0, 1] + np.log(2.0)
    far.requires_grad_(True)
    clipped, _ = hepo_loss(far, level_logp.detach(), ids, rewards, mask, clip=0.2)
    clipped.backward()
    assert far.grad[0, 0, 1] == 0 and far.grad[0, 1, 1] > 0  # type: ignore[index]


def _beam(tok_ids: tuple[int, ...], ad_id: str, bid: float, bid_type: str,
          logprob: float = -1.0) -> BeamCandidate:
    return BeamCandidate(ad_id=ad_id, semantic_id=list(tok_ids), logprob=logprob,
                         expected_value=0.0, bid=bid, bid_type=bid_type)  # type: ignore[arg-type]


def _item(ad_id: str, pos: int, bid: float, bid_type: str, reward: float,
          score: float = -2.0) -> FeedbackItem:
    return FeedbackItem(ad_id=ad_id, semantic_id=[], position=pos, score=score, bid=bid,
                        bid_type=bid_type, clicked=reward > 0 and bid_type == "cpc",  # type: ignore[arg-type]
                        reward=reward)


def _feedback(fb: Feedback, items: list[FeedbackItem], beams: list[BeamCandidate]) -> Feedback:
    return Feedback(request_id=fb.request_id, user_id=fb.user_id, kind="final", revision=0,
                    impression_time=0.0, event_time=1.0, elapsed_s=1.0, window_closed=True,
                    context=fb.context, recent_ad_ids=fb.recent_ad_ids,
                    recent_organic=fb.recent_organic, items=items, beams=beams)


def test_lists_to_batch_builds_beam_tensors_and_leaves_unknown_ads_out(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog) -> None:
    tok, model = trained_lazy.tokenizer, trained_lazy.model
    base = synth_log.feedback[0]
    ids = {a.ad_id: tok.ids_of(a.ad_id) for a in synth_log.ads[:4]}
    a0, a1, a2, a3 = ids
    beams = [_beam(ids[a0], a0, 2.0, "cpc", -0.5), _beam((0, 0), "unknown-ad", 1.0, "cpc"),
             _beam(ids[a1], a1, 3000.0, "cpm", -1.5), _beam(ids[a2], a2, 4.0, "cpa", -2.5)]
    with_beams = _feedback(base, [_item(a0, 0, 2.0, "cpc", 2.0), _item(a3, 1, 1.0, "cpc", 0.0)],
                           beams)
    without = _feedback(base, [_item(a3, 0, 1.0, "cpc", 1.0, score=-0.25)], [])
    b = lists_to_batch([(with_beams, 1.0), (without, 0.5)], tok, model)
    assert b.beam_items is not None and b.beam_mask is not None
    assert b.beam_items.shape == (2, 4, tok.config.id_len)
    assert b.beam_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]     # unknown ad left out
    assert [tuple(r) for r in b.beam_items[0, :3].tolist()] == [ids[a0], ids[a1], ids[a2]]
    assert b.beam_logprob is not None and b.beam_logprob[0, :3].tolist() == [-0.5, -1.5, -2.5]
    assert b.beam_shown is not None and b.beam_shown.tolist()[0] == [1, 0, 0, 0]
    assert b.beam_rewards is not None and b.beam_rewards[0, 0] == 2.0
    assert b.beam_bid_type is not None and b.beam_bid_type[0, :3].tolist() == [0, 2, 1]
    # a list without logged beams contributes its shown items
    assert tuple(b.beam_items[1, 0].tolist()) == ids[a3]
    assert b.beam_logprob[1, 0] == -0.25 and b.beam_shown[1, 0] == 1
    assert b.beam_allowed is None
    trie = IdTrie(np.array([tok.ids_of(a.ad_id) for a in synth_log.ads]),
                  tok.config.token_sizes)
    bt = lists_to_batch([(with_beams, 1.0), (without, 0.5)], tok, model, trie)
    assert bt.beam_allowed is not None and bt.allowed is not None
    assert bt.beam_allowed.shape[:3] == (2, 4, tok.config.id_len)
    assert bt.beam_allowed.shape[3] == bt.allowed.shape[3]
    assert torch.equal(bt.beam_allowed[0, 0], bt.allowed[0, 0])    # same ad, same rows
    # no list with beams, or nothing to read them: no beam tensors at all
    assert lists_to_batch([(without, 1.0)], tok, model).beam_items is None
    assert lists_to_batch([(with_beams, 1.0)], tok, model, beams=False).beam_items is None


def test_hepo_update_moves_probability_to_the_better_sibling_beam(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    tok = trained_lazy.tokenizer
    model = copy.deepcopy(trained_lazy.model)
    ids = {a.ad_id: tok.ids_of(a.ad_id) for a in synth_log.ads}
    # two ads that share their level-0 code and differ at level 1
    good, bad = next((a, b) for a, b in itertools.permutations(ids, 2)
                     if ids[a][0] == ids[b][0] and ids[a][1] != ids[b][1])
    # CPM: the expected value is bid / 1000 whatever the value model says
    beams = [_beam(ids[good], good, 5000.0, "cpm"), _beam(ids[bad], bad, 1.0, "cpm")]
    lists = [(_feedback(fb, [_item(bad, 0, 1.0, "cpm", 0.001)], beams), 1.0)
             for fb in synth_log.feedback[:8]]
    b = lists_to_batch(lists, tok, model)
    cfg = RSPOConfig(rspo_weight=0.0, vsl_alpha=0.0, hepo_weight=1.0)
    learner = OnlineLearner(model, cfg, lr=3e-3, value_weight=0.0)

    def split_margin() -> float:
        model.eval()
        with torch.no_grad():
            assert b.beam_items is not None
            lp = model.level_logprob(b, b.beam_items)
        return float((lp[:, 0, 1] - lp[:, 1, 1]).mean())

    before = split_margin()
    metrics = {}
    for _ in range(5):
        metrics = learner.update(b)
    after = split_margin()
    assert after > before + 0.05, (before, after)
    assert metrics["hepo"] != 0 and metrics["hepo_beams_per_list"] == 2.0
    # the shared level and the levels below the split carry no credit: only 8 lists x 2
    # beams x the split level count
    assert metrics["hepo_tokens"] == 16
