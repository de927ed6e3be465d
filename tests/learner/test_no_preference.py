"""Lists that state no preference between their items (RSPO learns nothing from them)
are recognised, so that the learner can count and log them."""

from __future__ import annotations

from learner.online import NO_PREFERENCE, no_preference
from streams.schemas import Feedback, FeedbackItem


def _list(rewards: list[float]) -> Feedback:
    return Feedback(request_id="r", user_id="u", kind="final", revision=1,
                    impression_time=0.0, event_time=10.0, elapsed_s=10.0, window_closed=True,
                    items=[FeedbackItem(ad_id=f"a{i}", semantic_id=[], position=i, score=0.0,
                                        bid=1.0, bid_type="cpc", reward=r, clicked=r > 0)
                           for i, r in enumerate(rewards)])


def test_one_item_and_equal_reward_lists_state_no_preference() -> None:
    assert no_preference(_list([1.0])) == "one_item"
    assert no_preference(_list([0.0])) == "one_item"
    assert no_preference(_list([0.0, 0.0, 0.0])) == "equal_rewards"
    assert no_preference(_list([1.0, 1.0])) == "equal_rewards"
    assert no_preference(_list([0.0, 1.0, 0.0])) is None
    assert set(NO_PREFERENCE._labelnames) == {"reason"}
