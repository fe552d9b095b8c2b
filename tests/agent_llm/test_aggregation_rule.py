"""The LLM chooses the aggregation rule: schema, prompt, parsing, guard, counting.

Unit tests answer through litellm's ``mock_response`` (no HTTP); one test goes
through the real HTTP path against the scripted OpenAI-compatible stub.
"""

from __future__ import annotations

import json
import logging
from typing import Any, get_args

import pytest
from support.openai_stub import OpenAIStub, Reply

from agent_strategy import (
    DetectionParams,
    DeterministicPolicy,
    Observation,
)
from agent_strategy.llm import PolicyRouter
from agent_strategy.llm.answer import (
    AggregateAnswer,
    InvalidAnswer,
    answer_schema,
    parse_answer,
)
from agent_strategy.llm.prompt import RULE_MEANINGS, render_prompt
from agent_strategy.types import AggregationRule

from .llm_factories import (
    aggregate_obs,
    assert_obeys_guard,
    limits,
    mock_completion,
    mock_policy,
    stub_policy,
)

_MISSING = object()


def _answer(rule: Any = _MISSING, n: int = 5) -> str:
    body: dict[str, Any] = {
        "weights": [{"id": f"c{i}", "weight": 1.0} for i in range(n)],
        "flags": [],
        "rationale": "equal weights",
    }
    if rule is not _MISSING:
        body["aggregation"] = rule
    return json.dumps(body)


def _obs(*rules: AggregationRule, **kw: Any) -> Observation:
    return aggregate_obs(limits=limits(rules=rules, **kw))


def _suspicious_obs(max_flag_share: float) -> Observation:
    """Five replies, two reversed and amplified: more suspects than a 0.2 flag share
    allows (the detectors flag a reversed update only with a large norm)."""
    base = aggregate_obs(limits=limits(max_flag_share=max_flag_share))
    replies = tuple(
        r.model_copy(
            update={"cosine_to_median": -0.9, "update_norm": 2.0 * r.update_norm}
        )
        if r.id in ("c1", "c3")
        else r
        for r in base.replies
    )
    return base.model_copy(update={"replies": replies})


# ------------------------------------------------------------- schema and prompt
def test_every_rule_has_a_one_line_meaning() -> None:
    assert set(RULE_MEANINGS) == set(get_args(AggregationRule))
    assert all("\n" not in m for m in RULE_MEANINGS.values())


def test_schema_and_prompt_offer_only_the_allowed_rules() -> None:
    obs = _obs("median", "weighted")

    prop = answer_schema(obs)["properties"]["aggregation"]
    rendered = render_prompt(obs)
    system = rendered.messages[0]["content"]

    assert prop["anyOf"][0]["enum"] == ["median", "weighted"]
    assert {"type": "null"} in prop["anyOf"]
    assert "aggregation" in answer_schema(obs)["required"]
    assert f"median = {RULE_MEANINGS['median']}" in system
    assert f"weighted = {RULE_MEANINGS['weighted']}" in system
    assert "krum =" not in system and "trimmed =" not in system
    assert rendered.schema["properties"]["aggregation"] == prop


def test_a_single_allowed_rule_is_not_offered() -> None:
    obs = _obs("weighted")

    schema = answer_schema(obs)

    assert "aggregation" not in schema["properties"]
    assert "aggregation" not in schema["required"]
    assert "aggregation (" not in render_prompt(obs).messages[0]["content"]


def test_train_schema_has_no_rule() -> None:
    obs = _obs("weighted", "median").model_copy(update={"phase": "train"})

    assert "aggregation" not in answer_schema(obs)["properties"]


# ------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("given", "parsed"),
    [("krum", "krum"), (" Median ", "median"), (None, None), (_MISSING, None)],
)
def test_rule_is_parsed_or_left_open(given: Any, parsed: str | None) -> None:
    answer = parse_answer(_answer(given), _obs("weighted", "median", "krum"))

    assert isinstance(answer, AggregateAnswer)
    assert answer.aggregation == parsed


@pytest.mark.parametrize("bad", ["fedavg", 3, ["median"]])
def test_unknown_rule_name_is_a_schema_error(bad: Any) -> None:
    with pytest.raises(InvalidAnswer) as e:
        parse_answer(_answer(bad), _obs("weighted", "median"))

    assert e.value.kind == "schema"
    assert "aggregation" in e.value.reason


# --------------------------------------------------- LLMPolicy via mock_response
def test_allowed_rule_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = mock_completion(monkeypatch, _answer("krum"))
    policy, obs = mock_policy(), _obs("weighted", "median", "krum")

    decision = policy.decide(obs)

    assert len(calls) == 1
    assert decision.source == "llm"
    assert decision.aggregation == "krum"
    assert "[rule krum (llm)]" in decision.rationale
    assert policy.corrections["aggregation"] == 0
    assert policy.last_call is not None
    assert not any("aggregation" in c for c in policy.last_call.guard_changes)
    assert_obeys_guard(decision, obs)


@pytest.mark.parametrize(
    ("rules", "first"),
    [(("weighted", "median"), "weighted"), (("median", "weighted"), "median")],
)
def test_disallowed_rule_is_replaced_counted_and_logged(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    rules: tuple[AggregationRule, ...],
    first: str,
) -> None:
    mock_completion(monkeypatch, _answer("krum"))
    policy, obs = mock_policy(), _obs(*rules)

    with caplog.at_level(logging.WARNING, logger="agent_strategy.llm.policy"):
        decision = policy.decide(obs)
        decision_again = policy.decide(obs)

    assert decision.source == "llm"  # the weights are still the LLM's
    assert decision.aggregation == first
    assert decision_again.aggregation == first
    assert policy.corrections["aggregation"] == 2
    assert policy.corrections["guard"] >= 2
    assert policy.stats()["corrections"]["aggregation"] == 2
    assert dict(policy.fallbacks) == {}
    assert policy.last_call is not None
    assert any(
        "aggregation 'krum' not allowed" in c for c in policy.last_call.guard_changes
    )
    logged = [r.getMessage() for r in caplog.records]
    assert sum("chose aggregation 'krum'" in m for m in logged) == 2
    assert_obeys_guard(decision, obs)


@pytest.mark.parametrize("given", [_MISSING, None])
@pytest.mark.parametrize(
    ("flag_share", "expected"), [(1.0, "weighted"), (0.2, "median")]
)
def test_missing_rule_takes_the_deterministic_choice(
    monkeypatch: pytest.MonkeyPatch, given: Any, flag_share: float, expected: str
) -> None:
    det = DeterministicPolicy(seed=0, detection=DetectionParams())
    obs = _suspicious_obs(flag_share)
    assert det.decide(obs).aggregation == expected  # the premise of the case
    mock_completion(monkeypatch, _answer(given))
    policy = mock_policy(det)

    decision = policy.decide(obs)

    assert decision.source == "llm"
    assert decision.aggregation == expected
    assert f"[rule {expected} (default)]" in decision.rationale
    assert policy.corrections["aggregation"] == 0


def test_router_takes_the_weighting_policys_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mock_completion(monkeypatch, _answer("trimmed"))
    det = DeterministicPolicy(seed=0, detection=DetectionParams())
    obs = _suspicious_obs(0.2)  # the deterministic policy alone would choose median
    llm = mock_policy(det)

    via_llm = PolicyRouter.default(llm, det).decide(obs)
    via_det = PolicyRouter(
        {"llm": llm, "deterministic": det}, weighting="deterministic"
    ).decide(obs)

    assert (via_llm.aggregation, via_llm.source) == ("trimmed", "llm")
    assert (via_det.aggregation, via_det.source) == ("median", "deterministic")


# ------------------------------------------------------------------ real HTTP
def test_rule_choice_through_http(openai_stub: OpenAIStub) -> None:
    openai_stub.script(Reply(content=_answer("median")), Reply(content=_answer("krum")))
    policy = stub_policy(openai_stub.api_base)
    obs = _obs("weighted", "median")

    first = policy.decide(obs)
    second = policy.decide(obs)

    schema = openai_stub.requests[0]["response_format"]["schema"]
    assert schema["properties"]["aggregation"]["anyOf"][0]["enum"] == [
        "weighted",
        "median",
    ]
    assert (first.source, first.aggregation) == ("llm", "median")
    assert (second.source, second.aggregation) == ("llm", "weighted")
    assert policy.corrections["aggregation"] == 1
