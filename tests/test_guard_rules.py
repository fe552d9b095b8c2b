"""The guard bounds the aggregation rule by ``limits.rules``; SecAgg+ allows one."""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid
from support.factories import limits, plain_aggregate_obs, reply

from agent_strategy import Decision, DeterministicPolicy, guard
from agent_strategy.types import AggregationRule
from fl_server.secagg_strategy import SecAggStrategy
from fl_server.strategy import AgentStrategy

ALL: tuple[AggregationRule, ...] = ("weighted", "trimmed", "median", "krum")


def _decision(rule: AggregationRule) -> Decision:
    return Decision(weights={"c0": 1.0, "c1": 1.0, "c2": 1.0}, aggregation=rule)


@pytest.mark.parametrize("rule", ALL)
def test_allowed_rule_is_kept(rule: AggregationRule) -> None:
    obs = plain_aggregate_obs(
        [reply("c0"), reply("c1"), reply("c2")], limits=limits(rules=ALL)
    )

    g = guard(_decision(rule), obs)

    assert g.decision.aggregation == rule
    assert not any("aggregation" in c for c in g.changes)


@pytest.mark.parametrize(
    ("rules", "asked"),
    [(("weighted", "median"), "krum"), (("median", "trimmed"), "weighted")],
)
def test_disallowed_rule_becomes_the_first_allowed(
    rules: tuple[AggregationRule, ...], asked: AggregationRule
) -> None:
    obs = plain_aggregate_obs(
        [reply("c0"), reply("c1"), reply("c2")], limits=limits(rules=rules)
    )

    g = guard(_decision(asked), obs)

    assert g.decision.aggregation == rules[0]
    assert [c for c in g.changes if "aggregation" in c] == [
        f"aggregation {asked!r} not allowed ({', '.join(rules)}); using {rules[0]!r}"
    ]
    assert guard(g.decision, obs).changes == ()  # idempotent


def _agent(rules: tuple[AggregationRule, ...]) -> AgentStrategy:
    return AgentStrategy(
        DeterministicPolicy(),
        clients_per_round=3,
        min_replies=2,
        limits=limits(rules=rules),
        local_epochs=1,
        lr=0.05,
    )


def _secagg(agent: AgentStrategy) -> SecAggStrategy:
    def evaluate(server_round: int, arrays: ArrayRecord) -> Any:
        return None

    return SecAggStrategy(
        agent,
        grid=cast(Grid, None),  # not used before the first round
        initial=ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}),
        evaluate_fn=evaluate,
    )


@pytest.mark.parametrize("rules", [ALL, ("median",)])
def test_secagg_limits_the_rules_to_the_weighted_mean_and_says_so(
    caplog: pytest.LogCaptureFixture, rules: tuple[AggregationRule, ...]
) -> None:
    agent = _agent(rules)

    with caplog.at_level(logging.WARNING, logger="agentfl.secagg"):
        _secagg(agent)

    assert agent.limits.rules == ("weighted",)
    notes = [r.getMessage() for r in caplog.records if "robust rule" in r.getMessage()]
    assert len(notes) == 1 and ",".join(rules) in notes[0]
    obs = plain_aggregate_obs(
        [reply("c0"), reply("c1"), reply("c2")], limits=agent.limits
    )
    g = guard(_decision("median"), obs)
    assert g.decision.aggregation == "weighted"
    assert any("aggregation 'median' not allowed" in c for c in g.changes)


def test_secagg_with_only_the_weighted_mean_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = _agent(("weighted",))

    with caplog.at_level(logging.WARNING, logger="agentfl.secagg"):
        _secagg(agent)

    assert agent.limits.rules == ("weighted",)
    assert not [r for r in caplog.records if "robust rule" in r.getMessage()]
