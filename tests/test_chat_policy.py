"""The chat's context-window policy (`runtime.chat.plan_turn`) on token counts alone: no library needed.
Pages hold 16 tokens (`KV_PAGE_SIZE`)."""

from __future__ import annotations

import pytest

from mobilevlm_mlc.errors import MobileVLMError
from mobilevlm_mlc.runtime.chat import TurnPlan, TurnSize, plan_turn


def test_first_turn_renders_with_the_system_prompt():
    plan = plan_turn(
        [], TurnSize(40, 30), cached_tokens=0, pending_tokens=0, window=256, max_new_tokens=64, free_tokens=256
    )
    assert plan == TurnPlan(dropped=0, rerender=False, size=40, pages=3)


def test_a_later_turn_feeds_the_unfed_token_and_its_message():
    held = [TurnSize(50, 40)]
    plan = plan_turn(
        held, TurnSize(45, 35), cached_tokens=60, pending_tokens=1, window=256, max_new_tokens=64, free_tokens=256
    )
    assert plan == TurnPlan(dropped=0, rerender=False, size=36, pages=2)  # tokens 60..95: pages 4 and 5


def test_oldest_turns_go_until_the_rest_fills_half_the_window():
    held = [TurnSize(100, 90), TurnSize(80, 70), TurnSize(60, 50)]
    # 230 held + 30 new + min(64, 256 // 4) answer tokens > 256: keep the last turn (60 as first) + the new one (30)
    plan = plan_turn(
        held, TurnSize(40, 30), cached_tokens=230, pending_tokens=0, window=256, max_new_tokens=64, free_tokens=0
    )
    assert plan == TurnPlan(dropped=2, rerender=True, size=90, pages=6 - 15)  # gives 15 pages back, takes 6


def test_every_turn_goes_when_none_fits_beside_the_new_message():
    plan = plan_turn([TurnSize(200, 190)], TurnSize(100, 90), 220, 0, window=256, max_new_tokens=64, free_tokens=0)
    assert plan == TurnPlan(dropped=1, rerender=True, size=100, pages=7 - 14)


def test_a_short_answer_budget_keeps_the_history():
    plan = plan_turn([TurnSize(100, 90)], TurnSize(40, 30), 200, 0, window=256, max_new_tokens=8, free_tokens=256)
    assert plan == TurnPlan(dropped=0, rerender=False, size=30, pages=2)  # 200 + 30 + 8 <= 256


@pytest.mark.parametrize("size", [256, 300])
def test_a_message_that_alone_fills_the_window_is_refused(size):
    with pytest.raises(
        MobileVLMError,
        match=rf"^prompt of {size} tokens \(with image tokens\) does not fit the context window of 256 tokens$",
    ):
        plan_turn([], TurnSize(size, size - 10), 0, 0, window=256, max_new_tokens=64, free_tokens=4096)


def test_a_full_kv_cache_is_refused():
    with pytest.raises(
        MobileVLMError,
        match=r"^prompt of 40 tokens does not fit the KV cache: 32 tokens free \(close other chat sessions\)$",
    ):
        plan_turn([], TurnSize(40, 30), 0, 0, window=256, max_new_tokens=64, free_tokens=32)
