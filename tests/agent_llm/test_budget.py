from __future__ import annotations

import json
import math

import pytest

from agent_strategy.llm.budget import Budget, BudgetExhausted, Usage


def test_no_caps_never_exhausts() -> None:
    budget = Budget()

    for _ in range(100):
        budget.check()
        budget.charge(Usage(1000, 1000), 1.0)

    assert budget.calls == 100 and budget.tokens == 200_000
    assert budget.remaining() == {"calls": None, "tokens": None, "cost_usd": None}


@pytest.mark.parametrize(
    ("caps", "charges", "reason"),
    [
        ({"max_calls": 2}, [(None, 0.0), (None, 0.0)], "calls: 2 of 2 used"),
        ({"max_tokens": 100}, [(Usage(60, 40), 0.0)], "tokens: 100 of 100 used"),
        ({"max_cost_usd": 0.01}, [(Usage(1, 1), 0.006)] * 2, "cost: $0.0120"),
        ({"max_calls": 0}, [], "calls: 0 of 0 used"),
    ],
)
def test_caps_raise_with_a_reason(
    caps: dict[str, float], charges: list[tuple[Usage | None, float]], reason: str
) -> None:
    budget = Budget(**caps)  # type: ignore[arg-type]
    for usage, cost in charges:
        budget.check()
        budget.charge(usage, cost)

    with pytest.raises(BudgetExhausted) as e:
        budget.check()

    assert e.value.reason.startswith(reason)


def test_bad_costs_count_as_zero() -> None:
    budget = Budget(max_cost_usd=1.0)

    budget.charge(None, math.nan)
    budget.charge(None, -5.0)

    assert budget.cost_usd == 0.0
    budget.check()


@pytest.mark.parametrize("cap", [-1, math.inf, math.nan])
def test_invalid_caps_are_refused(cap: float) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        Budget(max_tokens=cap)  # type: ignore[arg-type]


def test_state_round_trips_through_json() -> None:
    budget = Budget(max_calls=10, max_tokens=None, max_cost_usd=2.5)
    budget.charge(Usage(10, 5), 0.25)
    budget.charge(None, 0.0)

    restored = Budget.from_state_dict(json.loads(json.dumps(budget.state_dict())))

    assert restored.state_dict() == budget.state_dict()
    assert restored.remaining() == {"calls": 8, "tokens": None, "cost_usd": 2.25}
