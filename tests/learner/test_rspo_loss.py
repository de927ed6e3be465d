"""The RSPO loss moves probability toward higher-value ids, and is inert when it should be."""

from __future__ import annotations

import torch

from learner.rspo import fake_negative_weight, hepo_loss, rank_gain_weights, rspo_loss


def _toy_policy_step(rewards: torch.Tensor, steps: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """A softmax policy over 6 ids; π_ref = the initial policy; train on one list of 6."""
    torch.manual_seed(0)
    logits = torch.zeros(6, requires_grad=True)
    ref = torch.log_softmax(torch.zeros(6), 0)
    opt = torch.optim.SGD([logits], lr=0.5)
    mask = torch.ones(1, 6)
    before = torch.softmax(logits.detach(), 0).clone()
    for _ in range(steps):
        logp = torch.log_softmax(logits, 0).unsqueeze(0)
        loss, _ = rspo_loss(logp, ref.unsqueeze(0), rewards.unsqueeze(0), mask, beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, torch.softmax(logits.detach(), 0)


def test_updates_raise_higher_value_ids_and_lower_lower_value_ids() -> None:
    rewards = torch.tensor([0.0, 3.0, 0.5, 2.0, 0.0, 1.0])
    before, after = _toy_policy_step(rewards)
    assert after[1] > before[1]                       # best id gains most
    assert after[1] == after.max()
    assert after[0] < before[0] and after[4] < before[4]   # zero-value ids lose
    ranking = torch.argsort(after, descending=True)[:4].tolist()
    assert ranking == [1, 3, 5, 2]                    # probability follows value order


def test_gradient_is_zero_when_policy_equals_reference_and_rewards_are_equal() -> None:
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 5, generator=gen), 1).requires_grad_(True)
    rewards = torch.full((4, 5), 2.5)
    loss, stats = rspo_loss(logp, logp.detach(), rewards, torch.ones(4, 5), beta=0.7)
    loss.backward()
    assert logp.grad is not None
    assert torch.count_nonzero(logp.grad) == 0
    assert stats["lists_with_preference"] == 0


def test_padding_and_ties_are_not_negatives() -> None:
    logp = torch.zeros(1, 4, requires_grad=True)
    rewards = torch.tensor([[1.0, 1.0, 0.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])        # the 5.0 item is padding
    loss, _ = rspo_loss(logp, torch.zeros(1, 4), rewards, mask, beta=1.0)
    loss.backward()
    g = logp.grad[0]  # type: ignore[index]
    assert g[3] == 0                                   # padding untouched
    assert g[0] < 0 and g[1] < 0 and torch.isclose(g[0], g[1])  # tied winners pushed up alike
    assert g[2] > 0                                    # the loser pushed down


def test_rank_gain_puts_more_weight_on_top_positions_and_bigger_gaps() -> None:
    order, lam = rank_gain_weights(torch.tensor([[1.0, 4.0, 2.0, 0.0]]), torch.ones(1, 4))
    assert order[0].tolist() == [1, 2, 0, 3]
    assert lam[0, 0] > lam[0, 1] > lam[0, 2] > 0 and lam[0, 3] == 0


def test_list_weight_scales_a_lists_contribution() -> None:
    logp = torch.zeros(2, 3, requires_grad=True)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = rspo_loss(logp, torch.zeros(2, 3), rewards, torch.ones(2, 3), beta=1.0,
                        list_weight=torch.tensor([1.0, 0.25]))
    loss.backward()
    g = logp.grad  # type: ignore[assignment]
    assert torch.isclose(g[1, 0] / g[0, 0], torch.tensor(0.25))  # type: ignore[index]


def test_hepo_credit_pushes_the_better_branch_at_each_level() -> None:
    ids = torch.tensor([[[0, 0], [0, 1], [1, 0], [1, 1]]])
    rewards = torch.tensor([[4.0, 2.0, 0.0, 0.0]])
    level_logp = torch.zeros(1, 4, 2, requires_grad=True)
    loss, _ = hepo_loss(level_logp, torch.zeros(1, 4, 2), ids, rewards, torch.ones(1, 4))
    loss.backward()
    g = level_logp.grad[0]  # type: ignore[index]
    assert g[0, 0] < 0 and g[1, 0] < 0 and g[2, 0] > 0      # level 0: branch 0 is better
    assert g[0, 1] < 0 and g[1, 1] > 0                       # level 1 within branch 0
    assert g[2, 1] == 0 and g[3, 1] == 0                      # equal siblings: no credit


def test_fake_negative_weight_grows_with_elapsed_time() -> None:
    w = fake_negative_weight(torch.tensor([0.0, 60.0, 600.0, 3600.0, 36000.0]))
    assert w[0] == 0 and torch.all(w[1:] > w[:-1]) and w[-1] > 0.95
